//! The e2e suite on a simulated cluster: the real control plane, three simulated GPU nodes (each
//! a tessera-kubelet-plugin and the kubelet stand-in, running containers with podman + runc),
//! tessera-controller. One cluster per pinned version; the scenarios run one after another on
//! it, each with its own pods and claims:
//!
//! - the demo: two workers share the 10 GiB GPU, A hits its wall, B goes on;
//! - selection by per-model DeviceClass, by `productName` and by `uuid`;
//! - a request larger than any GPU stays Pending with the scheduler's reason;
//! - the plugin restarts between prepare and container start;
//! - the claim is deleted before unprepare (the kubelet was down meanwhile);
//! - two containers sharing one claim share one limit;
//! - memory oversubscription: on a node that overcommits its GPU, claims that opted in spill to
//!   host memory when the card is full, the one that did not keeps its share on the card; one
//!   that did not opt in waits in ContainerCreating until an opted-in claim frees its share.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{binaries_or_skip, init_tracing};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use serde_json::{Value, json};
use tessera_e2e_harness::K8sVersion;
use tessera_e2e_harness::cluster::{ClusterOptions, SimCluster};
use tessera_e2e_harness::demo::{self, claim_usage};
use tessera_e2e_harness::workloads::{self, ContainerSpec, Selection, Share};

const NS: &str = "default";
const STEP: Duration = Duration::from_secs(120);
const A100_CLASS: &str = "nvidia-a100-sxm4-40gb.gpu.tessera.dev";
const RTX3080: &str = "NVIDIA GeForce RTX 3080";
/// gpu-node-c's GPU: 16 GiB, overcommitted 1.25× (e2e/nodes/gpu-node-c.plugin-args).
const T4: &str = "Tesla T4";
const A100_GPU1: &str = "GPU-a1000000-0000-4000-8000-000000000001";
const HOLD: &str = "e2e.tessera.dev/hold-before-start";

fn nodes_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../nodes")
}

/// The programs the nodes run, refused when older than their sources (`cargo test` of this
/// crate alone does not rebuild other packages' binaries).
fn check_fresh() {
    use tessera_built_libs::built;
    built("tessera-kubelet-standin", &["e2e/kubelet-standin/src"]);
    built(
        "tessera-kubelet-plugin",
        &["kubelet-plugin/src", "driver/src", "controller/src"],
    );
    built("tessera-controller", &["controller/src"]);
    built("tessera-gpu-worker", &["e2e/gpu-worker/src"]);
    built("libtessera.so", &["shim/src", "api/src"]);
    built("libcuda.so", &["fake-gpu/cuda/src", "fake-gpu/model/src"]);
}

struct Suite {
    cluster: SimCluster,
    version: K8sVersion,
    shared: PathBuf,
    worker: String,
}

/// The 10 GiB GPU of gpu-node-b, by product name.
fn rtx3080() -> Selection {
    Selection::class("gpu.tessera.dev").cel(&format!(
        "device.attributes[\"gpu.tessera.dev\"].productName == \"{RTX3080}\""
    ))
}

/// The overcommitted T4 of gpu-node-c, by product name.
fn t4() -> Selection {
    Selection::class("gpu.tessera.dev").cel(&format!(
        "device.attributes[\"gpu.tessera.dev\"].productName == \"{T4}\""
    ))
}

fn share(memory: &str, cores: u32, tenths: u32) -> Share {
    Share {
        memory: memory.into(),
        cores,
        tenths,
        gpu_config: None,
    }
}

impl Suite {
    fn client(&self) -> kube::Client {
        self.cluster.client()
    }

    fn claims(&self) -> Api<DynamicObject> {
        Api::namespaced_with(
            self.client(),
            NS,
            &self.cluster.resource_api("ResourceClaim", "resourceclaims"),
        )
    }

    fn worker(&self, args: &[&str]) -> Vec<String> {
        std::iter::once(self.worker.clone())
            .chain(args.iter().map(|s| s.to_string()))
            .collect()
    }

    /// A template and a pod with one container `main` using it.
    async fn submit(
        &self,
        name: &str,
        selection: &Selection,
        share: &Share,
        command: Vec<String>,
        annotations: &[(&str, &str)],
    ) {
        let template = format!("{name}-gpu");
        let object = workloads::claim_template(self.version, NS, &template, selection, share);
        workloads::create(&self.client(), &object)
            .await
            .expect("creating the claim template");
        self.create_pod(name, &template, command, annotations).await;
    }

    /// Pod `name`: one container `main` running `command` on the claim made from `template`,
    /// with the suite's shared directory at `/shared`.
    async fn create_pod(
        &self,
        name: &str,
        template: &str,
        command: Vec<String>,
        annotations: &[(&str, &str)],
    ) {
        let container = ContainerSpec {
            name: "main".into(),
            command,
            claims: vec!["gpu".into()],
        };
        let shared = self.shared.display().to_string();
        let pod = workloads::pod(
            NS,
            name,
            &[("gpu", template)],
            &[container],
            &[(&shared, "/shared")],
            annotations,
        );
        workloads::create(&self.client(), &pod)
            .await
            .expect("creating the pod");
    }

    /// A pod on the RTX 3080 held between prepare and start (see the stand-in's
    /// `hold-before-start`); returns its claim's UID and name once the plugin has prepared it.
    async fn submit_prepared_and_held(
        &mut self,
        name: &str,
        share: &Share,
        command: Vec<String>,
    ) -> (String, String) {
        self.submit(name, &rtx3080(), share, command, &[(HOLD, "true")])
            .await;
        let claim = self.allocated_claim(name).await;
        let field = |f: &str| claim["metadata"][f].as_str().unwrap_or_default().to_owned();
        let (uid, claim_name) = (field("uid"), field("name"));
        self.wait_file(&cdi_spec(&uid), true, "the claim's CDI spec after prepare")
            .await;
        (uid, claim_name)
    }

    /// Waits until gpu-node-b's plugin has unprepared the claim: its CDI spec and its state
    /// directory (config, region) are gone.
    async fn wait_unprepared(&mut self, uid: &str, when: &str) {
        self.wait_file(&cdi_spec(uid), false, &format!("the CDI spec {when}"))
            .await;
        let claim_dir = self
            .cluster
            .node("gpu-node-b")
            .plugin_state_dir()
            .join("claims")
            .join(uid);
        self.wait_file(&claim_dir, false, &format!("the claim's state {when}"))
            .await;
    }

    async fn wait(&mut self, pod: &str, what: &str, done: impl Fn(&Pod) -> bool) -> Pod {
        workloads::wait_pod(&mut self.cluster, NS, pod, what, STEP, done)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", self.version))
    }

    async fn finished(&mut self, pod: &str) -> Pod {
        self.wait(pod, "finished", |p| {
            matches!(workloads::phase(p), "Succeeded" | "Failed")
        })
        .await
    }

    fn log(&mut self, pod: &Pod, container: &str) -> String {
        let node = workloads::node_name(pod);
        let dir = self.cluster.node(&node).pod_dir(
            NS,
            pod.metadata.name.as_deref().unwrap_or_default(),
            pod.metadata.uid.as_deref().unwrap_or_default(),
        );
        std::fs::read_to_string(dir.join(format!("{container}.log"))).unwrap_or_default()
    }

    /// The claim generated for the pod's `gpu` entry, once allocated.
    async fn allocated_claim(&mut self, pod: &str) -> Value {
        let deadline = Instant::now() + STEP;
        loop {
            let pods: Api<Pod> = Api::namespaced(self.client(), NS);
            if let Ok(p) = pods.get(pod).await
                && let Some(name) = p
                    .status
                    .as_ref()
                    .and_then(|s| s.resource_claim_statuses.as_ref())
                    .and_then(|c| c.first())
                    .and_then(|c| c.resource_claim_name.clone())
                && let Ok(Some(claim)) = self.claims().get_opt(&name).await
                && claim.data.pointer("/status/allocation").is_some()
            {
                return serde_json::to_value(&claim).expect("claim json");
            }
            if Instant::now() >= deadline {
                let pods: Api<Pod> = Api::namespaced(self.client(), NS);
                let conditions = pods
                    .get(pod)
                    .await
                    .ok()
                    .and_then(|p| p.status)
                    .and_then(|s| s.conditions);
                panic!(
                    "{}: the claim of {pod} was not allocated in {STEP:?}; conditions: {conditions:?}\nscheduler log:\n{}",
                    self.version,
                    tessera_e2e_harness::process::log_tail(
                        &self.cluster.control_plane().state().log("kube-scheduler"),
                        40
                    )
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Waits until the claims of earlier scenarios are gone (the garbage collector deletes a
    /// generated claim after its pod), so the scheduler meets a settled node.
    async fn no_claims_left(&self) {
        let deadline = Instant::now() + STEP;
        loop {
            let left: Vec<String> = self
                .claims()
                .list(&Default::default())
                .await
                .map(|l| {
                    l.items
                        .into_iter()
                        .filter_map(|c| c.metadata.name)
                        .collect()
                })
                .unwrap_or_default();
            if left.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: claims of earlier scenarios still there: {left:?}",
                self.version
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    async fn delete_pod(&mut self, pod: &str) {
        let pods: Api<Pod> = Api::namespaced(self.client(), NS);
        pods.delete(pod, &DeleteParams::default())
            .await
            .expect("deleting the pod");
        workloads::wait_gone(&mut self.cluster, NS, pod, STEP)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", self.version));
    }

    async fn wait_file(&self, path: &Path, present: bool, what: &str) {
        let deadline = Instant::now() + STEP;
        while path.exists() != present {
            assert!(
                Instant::now() < deadline,
                "{}: {what}: {} {}",
                self.version,
                path.display(),
                if present {
                    "never appeared"
                } else {
                    "was never removed"
                }
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn results(claim: &Value) -> Vec<(String, String)> {
    claim
        .pointer("/status/allocation/devices/results")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["pool"].as_str().unwrap_or_default().to_owned(),
                r["device"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn cdi_spec(claim_uid: &str) -> PathBuf {
    Path::new(tessera_e2e_harness::cluster::node::CDI_DIR).join(format!("tessera-{claim_uid}.json"))
}

/// A simulated cluster of `version` with its nodes in `mode` (`None`: the suite's default), or
/// `None` when the test skips; the state directory lives as long as the suite.
async fn start_suite(
    version: K8sVersion,
    test: &str,
    mode: Option<&str>,
    runtime_config: &[&str],
) -> Option<(Suite, common::StateDir, Instant)> {
    init_tracing();
    let binaries = binaries_or_skip(version, test)?;
    let machine_ready = tessera_built_libs::on_path("podman") && nix::unistd::geteuid().is_root();
    tessera_built_libs::require(test, machine_ready, || {
        "podman is missing or this is not root (scripts/install-podman.sh)".into()
    })?;
    check_fresh();
    let state = common::StateDir::new(test);
    let mut options =
        ClusterOptions::new(version, state.path(), &nodes_dir()).expect("cluster options");
    options.control_plane.binaries = Some(binaries);
    if let Some(mode) = mode {
        options.sharing_mode = mode.to_owned();
    }
    options
        .control_plane
        .extra_runtime_config
        .extend(runtime_config.iter().map(|c| c.to_string()));
    let asked_mode = options.sharing_mode.clone();
    let began = Instant::now();
    let cluster = SimCluster::start(options)
        .await
        .unwrap_or_else(|e| panic!("{test}: starting the simulated cluster: {e}"));
    eprintln!(
        "{test}: simulated cluster up in {:.1}s",
        began.elapsed().as_secs_f64()
    );
    let shared = state.path().join("shared");
    std::fs::create_dir_all(&shared).expect("shared dir");
    let worker = cluster.artifacts.gpu_worker.display().to_string();
    let suite = Suite {
        cluster,
        version,
        shared,
        worker,
    };
    // For the release matrix's table (docs/dra-features.md): what the nodes publish here.
    eprintln!(
        "{test}: sharing mode asked {asked_mode}, published {}",
        published_mode(&suite).await
    );
    Some((suite, state, began))
}

async fn run_suite(version: K8sVersion, test: &str) {
    let Some((mut suite, _state, began)) = start_suite(version, test, None, &[]).await else {
        return;
    };

    demo_scenario(&mut suite).await;
    selection_by_model_product_and_uuid(&mut suite).await;
    too_large_stays_pending(&mut suite).await;
    plugin_restart_between_prepare_and_start(&mut suite).await;
    claim_deleted_before_unprepare(&mut suite).await;
    two_containers_share_one_limit(&mut suite).await;
    if version.minor() >= 34 {
        prioritized_list_takes_the_first_that_fits(&mut suite).await;
    }
    if version.minor() >= 36 {
        admin_access_sees_the_whole_card(&mut suite).await;
    }
    oversubscribed_claims_spill_on_the_overcommitted_node(&mut suite).await;
    a_claim_that_may_not_spill_waits_for_its_share_of_the_card(&mut suite).await;
    suite
        .cluster
        .check_running()
        .expect("every Tessera process still runs");
    eprintln!(
        "{test}: all scenarios passed in {:.1}s",
        began.elapsed().as_secs_f64()
    );
}

/// The sharing mode the nodes' ResourceSlices show: consumable capacity (devices that allow
/// several allocations), partitions (shared counters), or fixed slices / whole GPUs.
async fn published_mode(suite: &Suite) -> String {
    let slices: Api<DynamicObject> = Api::all_with(
        suite.client(),
        &suite
            .version
            .resource_api("ResourceSlice", "resourceslices"),
    );
    let mut modes: Vec<&str> = Vec::new();
    for slice in slices
        .list(&Default::default())
        .await
        .expect("listing ResourceSlices")
    {
        let spec = &slice.data["spec"];
        let devices = spec["devices"].as_array().cloned().unwrap_or_default();
        let mode = if devices
            .iter()
            .any(|d| d["allowMultipleAllocations"] == json!(true))
        {
            "consumable"
        } else if spec["sharedCounters"]
            .as_array()
            .is_some_and(|c| !c.is_empty())
        {
            "partitioned"
        } else if devices.is_empty() {
            continue;
        } else {
            "fixed slices"
        };
        if !modes.contains(&mode) {
            modes.push(mode);
        }
    }
    if modes.is_empty() {
        "nothing".into()
    } else {
        modes.join(" + ")
    }
}

async fn demo_scenario(suite: &mut Suite) {
    let mut printed = Vec::new();
    let outcome = demo::two_workers(&mut suite.cluster, &demo::Stage::Simulated, &mut printed)
        .await
        .unwrap_or_else(|e| panic!("{}: demo: {e}", suite.version));
    let printed = String::from_utf8_lossy(&printed).into_owned();
    eprintln!("{printed}");
    let node = workloads::node_name(&outcome.worker_a);
    assert_eq!(node, "gpu-node-b", "worker-a on the 10 GiB GPU's node");
    assert_eq!(
        workloads::node_name(&outcome.worker_b),
        node,
        "both workers on one node"
    );
    assert_eq!(workloads::phase(&outcome.worker_a), "Failed");
    assert_eq!(workloads::exit_code(&outcome.worker_a, "train"), Some(1));
    assert!(
        outcome
            .worker_a_log
            .contains("cuMemGetInfo: 2.00 GiB free of 2.00 GiB"),
        "A sees its slice:\n{}",
        outcome.worker_a_log
    );
    assert!(
        outcome
            .worker_a_log
            .contains("CUDA_ERROR_OUT_OF_MEMORY with 2.00 GiB allocated"),
        "A hits its wall at 2 GiB:\n{}",
        outcome.worker_a_log
    );
    assert_eq!(
        workloads::phase(&outcome.worker_b_running),
        "Running",
        "B goes on after A failed"
    );
    assert_eq!(workloads::phase(&outcome.worker_b), "Succeeded");
    assert!(
        outcome
            .worker_b_log
            .contains("cuMemGetInfo: 3.00 GiB free of 3.00 GiB"),
        "{}",
        outcome.worker_b_log
    );
    assert!(
        outcome.worker_b_log.contains("allocated 2.50 GiB"),
        "{}",
        outcome.worker_b_log
    );
    // The plugin's metrics while B ran alone: its limit, its usage, one GPU.
    let b = outcome
        .usage
        .iter()
        .find(|u| u.claim == outcome.claims.1)
        .unwrap_or_else(|| panic!("no metrics for B's claim: {printed}"));
    assert_eq!(
        (b.memory_limit, b.memory_used),
        (3 << 30, 2560 << 20),
        "B's limit and usage"
    );
    let cores = if suite.version.minor() >= 34 {
        40.0
    } else {
        30.0
    };
    assert!(
        (b.cores - cores).abs() < 0.01,
        "B's cores: {} (want {cores})",
        b.cores
    );
    assert!(
        printed.contains(&outcome.claims.0) && printed.contains("2.00 GiB"),
        "A's claim and limit printed:\n{printed}"
    );
}

async fn selection_by_model_product_and_uuid(suite: &mut Suite) {
    let uuid_cel = format!("device.attributes[\"gpu.tessera.dev\"].uuid == \"{A100_GPU1}\"");
    let cases = [
        ("by-model", Selection::class(A100_CLASS), "gpu-node-a", None),
        ("by-product", rtx3080(), "gpu-node-b", None),
        (
            "by-uuid",
            // The fake node states its topology: the standard attributes are published.
            Selection::class("gpu.tessera.dev")
                .cel(&uuid_cel)
                .cel("device.attributes[\"resource.kubernetes.io\"].pcieRoot == \"pci0000:00\"")
                .cel("device.attributes[\"resource.kubernetes.io\"].numaNode == 0"),
            "gpu-node-a",
            Some(A100_GPU1),
        ),
    ];
    for (name, selection, node, uuid) in cases {
        let release = suite.shared.join(format!("release-{name}"));
        let command = suite.worker(&[
            "--allocate",
            "512Mi",
            "--hold-until",
            &format!("/shared/release-{name}"),
        ]);
        suite
            .submit(name, &selection, &share("1Gi", 10, 1), command, &[])
            .await;
        let claim = suite.allocated_claim(name).await;
        let devices = results(&claim);
        assert!(
            !devices.is_empty() && devices.iter().all(|(pool, _)| pool == node),
            "{name}: allocated on {devices:?}, want {node}"
        );
        let pod = suite
            .wait(name, "running with memory allocated", |p| {
                workloads::phase(p) == "Running"
            })
            .await;
        assert_eq!(
            workloads::node_name(&pod),
            node,
            "{name}: bound to the node of its GPU"
        );
        // The controller's view: the claim, its memory, and the pod it is reserved for.
        let claim_name = claim["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let pod_info = format!(
            "tessera_claim_pod_info{{namespace=\"{NS}\",claim=\"{claim_name}\",pod=\"{name}\"}} 1"
        );
        let port = suite.cluster.controller_metrics_port();
        let deadline = Instant::now() + STEP;
        loop {
            let body = tessera_e2e_harness::readiness::http_get(port, "/metrics")
                .await
                .map(|(_, b)| b)
                .unwrap_or_default();
            if body.contains(&pod_info) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: the controller never reported {pod_info}:\n{body}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if let Some(uuid) = uuid {
            // The GPU the claim is enforced on, as the node's plugin reports it.
            let port = suite.cluster.node(node).metrics_port;
            let claim_name = claim["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let usage = claim_usage(port).await.expect("plugin metrics");
            let gpus: Vec<&str> = usage
                .iter()
                .filter(|u| u.claim == claim_name)
                .map(|u| u.gpu_uuid.as_str())
                .collect();
            assert_eq!(gpus, vec![uuid], "{name}: limits on the selected GPU");
        }
        std::fs::write(&release, b"").expect("release");
        let pod = suite.finished(name).await;
        let log = suite.log(&pod, "main");
        assert_eq!(workloads::phase(&pod), "Succeeded", "{name}:\n{log}");
        let expected_model = if node == "gpu-node-a" {
            "NVIDIA A100-SXM4-40GB"
        } else {
            RTX3080
        };
        assert!(
            log.contains(&format!("GPU 0: {expected_model}")),
            "{name}: the container sees its model:\n{log}"
        );
        suite.delete_pod(name).await;
    }
}

async fn too_large_stays_pending(suite: &mut Suite) {
    let name = "too-large";
    // 64 GiB: more than any GPU (40 GiB). Before 1.34 (fixed tenths) a device with 64 GiB
    // of memory: asking for eleven tenths of one GPU would be the same request, but 1.31's
    // allocator searches every combination of tenths before it gives up, for minutes.
    let selection = if suite.version.minor() >= 34 {
        Selection::class("gpu.tessera.dev")
    } else {
        Selection::class("gpu.tessera.dev")
            .cel("device.capacity[\"gpu.tessera.dev\"].memory.compareTo(quantity(\"64Gi\")) >= 0")
    };
    suite
        .submit(
            name,
            &selection,
            &share("64Gi", 10, 1),
            suite.worker(&["--allocate", "1Mi"]),
            &[],
        )
        .await;
    let unschedulable = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| {
                c.iter().any(|c| {
                    c.type_ == "PodScheduled"
                        && c.status == "False"
                        && c.reason.as_deref() == Some("Unschedulable")
                })
            })
    };
    let pod = suite
        .wait(name, "marked unschedulable by the scheduler", unschedulable)
        .await;
    let message = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "PodScheduled"))
        .and_then(|c| c.message.clone())
        .unwrap_or_default();
    assert!(
        message.contains("cannot allocate all claims"),
        "the scheduler's reason names the claim: {message:?}"
    );
    assert_eq!(workloads::phase(&pod), "Pending");
    assert!(workloads::node_name(&pod).is_empty(), "never bound");
    suite.delete_pod(name).await;
}

async fn plugin_restart_between_prepare_and_start(suite: &mut Suite) {
    let name = "plugin-restart";
    let command = suite.worker(&["--allocate", "3Gi"]);
    let (uid, claim_name) = suite
        .submit_prepared_and_held(name, &share("2Gi", 20, 2), command)
        .await;
    prepared_claim_says_what_it_got(suite, &claim_name).await;
    let node = suite.cluster.node("gpu-node-b");
    node.kill_plugin();
    node.start_plugin().expect("restarting the plugin");
    // Let the container start only now, with what the first plugin instance prepared.
    let pods: Api<Pod> = Api::namespaced(suite.client(), NS);
    let patch = json!({ "metadata": { "annotations": { HOLD: null } } });
    pods.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("releasing the hold");
    let pod = suite.finished(name).await;
    let log = suite.log(&pod, "main");
    assert_eq!(
        workloads::exit_code(&pod, "main"),
        Some(1),
        "the wall still holds after the restart:\n{log}"
    );
    assert!(
        log.contains("CUDA_ERROR_OUT_OF_MEMORY with 2.00 GiB allocated"),
        "{log}"
    );
    suite.delete_pod(name).await;
    // Unprepared by the new plugin instance.
    suite.wait_unprepared(&uid, "after a plugin restart").await;
}

/// The plugin wrote what the prepared claim got into its `status.devices` (1.32+); 1.31 has no
/// such field, and the plugin counts its writes as not served instead of failing.
async fn prepared_claim_says_what_it_got(suite: &mut Suite, claim_name: &str) {
    let port = suite.cluster.node("gpu-node-b").metrics_port;
    let deadline = Instant::now() + STEP;
    loop {
        let claim = suite.claims().get(claim_name).await.expect("claim");
        let written = claim.data["status"]["devices"]
            .as_array()
            .and_then(|d| d.first().cloned());
        let metrics = tessera_e2e_harness::readiness::http_get(port, "/metrics")
            .await
            .map(|(_, body)| body)
            .unwrap_or_default();
        if suite.version.minor() < 32 {
            if metrics.contains("tessera_claim_status_writes_total{outcome=\"not_served\"}") {
                assert!(written.is_none(), "{}", claim.data["status"]);
                return;
            }
        } else if let Some(device) = written {
            assert_eq!(device["driver"], "gpu.tessera.dev", "{device}");
            assert_eq!(device["data"]["productName"], RTX3080, "{device}");
            assert_eq!(device["data"]["memoryLimit"], "2Gi", "{device}");
            assert_eq!(device["data"]["cores"], 20, "{device}");
            let ready = &device["conditions"][0];
            assert_eq!(
                (&ready["type"], &ready["status"]),
                (&json!("Ready"), &json!("True"))
            );
            assert!(
                ready["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("memory wall 2Gi, 20% of its compute")),
                "{ready}"
            );
            assert!(
                metrics.contains("tessera_claim_status_writes_total{outcome=\"written\"}"),
                "{metrics}"
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}: the plugin never said in {claim_name}'s status what it prepared: {}",
            suite.version,
            claim.data["status"]
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn claim_deleted_before_unprepare(suite: &mut Suite) {
    let name = "claim-gone";
    let command = suite.worker(&["--allocate", "1Mi"]);
    let (uid, claim_name) = suite
        .submit_prepared_and_held(name, &share("1Gi", 10, 1), command)
        .await;
    // The kubelet goes down; meanwhile the pod is force-deleted and its claim goes with it.
    suite.cluster.node("gpu-node-b").kill_standin();
    let pods: Api<Pod> = Api::namespaced(suite.client(), NS);
    pods.delete(
        name,
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        },
    )
    .await
    .expect("force-deleting the pod");
    let deadline = Instant::now() + STEP;
    while suite
        .claims()
        .get_opt(&claim_name)
        .await
        .ok()
        .flatten()
        .is_some()
    {
        assert!(
            Instant::now() < deadline,
            "{}: claim {claim_name} was not deleted after its pod",
            suite.version
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        cdi_spec(&uid).exists(),
        "still prepared while the kubelet is down"
    );
    // Back up: the stand-in unprepares from its checkpoint; the plugin needs no claim object.
    suite
        .cluster
        .node("gpu-node-b")
        .start_standin()
        .expect("restarting the stand-in");
    suite
        .wait_unprepared(&uid, "of a claim deleted before unprepare")
        .await;
    let port = suite.cluster.node("gpu-node-b").metrics_port;
    let usage = claim_usage(port).await.expect("plugin metrics");
    assert!(
        usage.iter().all(|u| u.claim != claim_name),
        "the plugin no longer reports {claim_name}: {usage:?}"
    );
}

/// `firstAvailable` (KEP-4816) end to end: the first alternative (48 GiB of an A100, more than
/// its 40 GiB) cannot be satisfied, so the scheduler takes the second (2 GiB of the RTX 3080);
/// the plugin prepares that alternative's share and the worker meets its 2 GiB wall. 1.31 has
/// no prioritised lists (the field is not in its API; consumable capacity, which the
/// alternatives use here, needs 1.34).
async fn prioritized_list_takes_the_first_that_fits(suite: &mut Suite) {
    let name = "first-available";
    let template = format!("{name}-gpu");
    let object = json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaimTemplate",
        "metadata": { "name": template, "namespace": NS },
        "spec": { "spec": { "devices": { "requests": [{ "name": "gpu", "firstAvailable": [
            { "name": "a100", "deviceClassName": A100_CLASS,
              "capacity": { "requests": { "memory": "48Gi", "cores": "50" } } },
            { "name": "rtx3080", "deviceClassName": "gpu.tessera.dev",
              "selectors": [{ "cel": { "expression":
                  format!("device.attributes[\"gpu.tessera.dev\"].productName == \"{RTX3080}\"") } }],
              "capacity": { "requests": { "memory": "2Gi", "cores": "20" } } },
        ] }] } } },
    });
    workloads::create(&suite.client(), &object)
        .await
        .expect("creating the claim template");
    suite.no_claims_left().await;
    // The worker waits for the test to have read the allocation: a pod that ends at once has
    // its generated claim deallocated and deleted, which a slow machine's poll can miss.
    let go = suite.shared.join("go-first-available");
    let _ = std::fs::remove_file(&go);
    let command = suite.worker(&[
        "--wait-for",
        "/shared/go-first-available",
        "--allocate",
        "3Gi",
    ]);
    suite.create_pod(name, &template, command, &[]).await;
    let claim = suite.allocated_claim(name).await;
    let result = &claim["status"]["allocation"]["devices"]["results"][0];
    assert_eq!(result["request"], "gpu/rtx3080", "{result}");
    assert_eq!(result["pool"], "gpu-node-b", "{result}");
    std::fs::write(&go, b"").expect("letting the worker go");
    let pod = suite.finished(name).await;
    let log = suite.log(&pod, "main");
    assert_eq!(workloads::exit_code(&pod, "main"), Some(1), "{log}");
    assert!(
        log.contains("CUDA_ERROR_OUT_OF_MEMORY with 2.00 GiB allocated"),
        "the second alternative's share is the wall:\n{log}"
    );
    suite.delete_pod(name).await;
}

/// Admin access (KEP-5018, GA in 1.36) end to end: the API server refuses an admin request in
/// a namespace the admin has not labelled, naming the label; once labelled, the scheduler
/// allocates the RTX 3080 to the admin claim and the plugin prepares it without the shim — the
/// worker sees the whole 10 GiB card and allocates past any slice's wall — and says so in the
/// claim's status and its metrics.
async fn admin_access_sees_the_whole_card(suite: &mut Suite) {
    use k8s_openapi::api::core::v1::Namespace;
    let name = "admin-monitor";
    let template = format!("{name}-gpu");
    let object = json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaimTemplate",
        "metadata": { "name": template, "namespace": NS },
        "spec": { "spec": { "devices": { "requests": [{ "name": "gpu", "exactly": {
            "deviceClassName": "gpu.tessera.dev",
            "adminAccess": true,
            "selectors": [{ "cel": { "expression":
                format!("device.attributes[\"gpu.tessera.dev\"].productName == \"{RTX3080}\"") } }],
        } }] } } },
    });
    let refused = workloads::create(&suite.client(), &object)
        .await
        .expect_err("adminAccess in a namespace without the admin's label");
    let refused = format!("{refused:?}");
    assert!(
        refused.contains("resource.kubernetes.io/admin-access"),
        "the API server names the label: {refused}"
    );
    let namespaces: Api<Namespace> = Api::all(suite.client());
    let label = |value: Value| json!({ "metadata": { "labels": { "resource.kubernetes.io/admin-access": value } } });
    namespaces
        .patch(
            NS,
            &PatchParams::default(),
            &Patch::Merge(&label(json!("true"))),
        )
        .await
        .expect("labelling the namespace");
    workloads::create(&suite.client(), &object)
        .await
        .expect("creating the admin template in the labelled namespace");
    let _ = std::fs::remove_file(suite.shared.join("release-admin"));
    let command = suite.worker(&["--allocate", "6Gi", "--hold-until", "/shared/release-admin"]);
    suite.create_pod(name, &template, command, &[]).await;
    let claim = suite.allocated_claim(name).await;
    let result = &claim["status"]["allocation"]["devices"]["results"][0];
    assert_eq!(result["adminAccess"], true, "{result}");
    let claim_name = claim["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let port = suite.cluster.node("gpu-node-b").metrics_port;
    let deadline = Instant::now() + STEP;
    loop {
        let metrics = tessera_e2e_harness::readiness::http_get(port, "/metrics")
            .await
            .map(|(_, body)| body)
            .unwrap_or_default();
        let status = suite.claims().get(&claim_name).await.expect("claim");
        let said = status.data["status"]["devices"][0]["data"]["adminAccess"] == true;
        if said
            && metrics.contains(&format!(
                "tessera_claim_admin_access{{namespace=\"{NS}\",claim=\"{claim_name}\""
            ))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}: the admin claim is not shown as such: {}",
            suite.version,
            status.data["status"]
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    std::fs::write(suite.shared.join("release-admin"), b"").expect("release");
    let pod = suite.finished(name).await;
    let log = suite.log(&pod, "main");
    assert_eq!(workloads::exit_code(&pod, "main"), Some(0), "{log}");
    assert!(
        log.contains("free of 10.00 GiB"),
        "the whole card, no slice:\n{log}"
    );
    suite.delete_pod(name).await;
    namespaces
        .patch(
            NS,
            &PatchParams::default(),
            &Patch::Merge(&label(Value::Null)),
        )
        .await
        .expect("removing the label");
}

async fn two_containers_share_one_limit(suite: &mut Suite) {
    let name = "two-containers";
    let template = format!("{name}-gpu");
    let selection = rtx3080();
    let object = workloads::claim_template(
        suite.version,
        NS,
        &template,
        &selection,
        &share("2Gi", 20, 2),
    );
    workloads::create(&suite.client(), &object)
        .await
        .expect("template");
    let _ = std::fs::remove_file(suite.shared.join("first-done"));
    let _ = std::fs::remove_file(suite.shared.join("second-done"));
    // The first holds 1.5 GiB until the second has tried 1 GiB of the same 2 GiB claim.
    let first = ContainerSpec {
        name: "first".into(),
        command: suite.worker(&[
            "--allocate",
            "1536Mi",
            "--touch",
            "/shared/first-done",
            "--hold-until",
            "/shared/second-done",
        ]),
        claims: vec!["gpu".into()],
    };
    let second = ContainerSpec {
        name: "second".into(),
        command: suite.worker(&[
            "--wait-for",
            "/shared/first-done",
            "--allocate",
            "1Gi",
            "--touch",
            "/shared/second-done",
        ]),
        claims: vec!["gpu".into()],
    };
    let shared = suite.shared.display().to_string();
    let pod = workloads::pod(
        NS,
        name,
        &[("gpu", &template)],
        &[first, second],
        &[(&shared, "/shared")],
        &[],
    );
    workloads::create(&suite.client(), &pod).await.expect("pod");
    let pod = suite.finished(name).await;
    let (first_log, second_log) = (suite.log(&pod, "first"), suite.log(&pod, "second"));
    assert_eq!(workloads::exit_code(&pod, "first"), Some(0), "{first_log}");
    assert_eq!(
        workloads::exit_code(&pod, "second"),
        Some(1),
        "the second container shares the first's limit:\n{second_log}"
    );
    assert!(
        second_log.contains("CUDA_ERROR_OUT_OF_MEMORY with 0.50 GiB allocated"),
        "{second_log}"
    );
    for log in [&first_log, &second_log] {
        assert!(
            log.contains("2.00 GiB"),
            "both containers see the claim's 2 GiB:\n{log}"
        );
    }
    assert_eq!(workloads::phase(&pod), "Failed");
    suite.delete_pod(name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_cluster_v1_37() {
    run_suite(K8sVersion::newest(), "sim-cluster-v1.37").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_cluster_v1_31() {
    run_suite("1.31".parse().expect("version"), "sim-cluster-v1.31").await;
}

/// `--sharing-mode auto` on a release before 1.34, where the suite asks `fixed:10`: what `auto`
/// picks from the API versions and fields the server keeps, and a claim allocated, prepared and
/// run in it. 1.31-1.33 as the harness runs them (`v1alpha3` or `v1beta1` turned on) serve no
/// shared counters or consumable capacity: fixed slices, four per GPU. 1.33 with its
/// `resource.k8s.io/v1beta2` turned on too (new beta APIs are off by default) keeps shared
/// counters (its DRAPartitionableDevices gate is on) and drops consumable capacity: partitions.
async fn auto_sharing_mode(
    version: K8sVersion,
    test: &str,
    runtime_config: &[&str],
    expected: &str,
) {
    let Some((mut suite, _state, _)) =
        start_suite(version, test, Some("auto"), runtime_config).await
    else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut published = published_mode(&suite).await;
    while published != expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        published = published_mode(&suite).await;
    }
    eprintln!("{test}: sharing mode asked auto, published {published}");
    assert_eq!(published, expected, "{}: what auto picks", suite.version);
    let command = suite.worker(&["--allocate", "256Mi"]);
    suite
        .submit("auto-mode", &rtx3080(), &share("1Gi", 10, 1), command, &[])
        .await;
    let pod = suite.finished("auto-mode").await;
    let log = suite.log(&pod, "main");
    assert_eq!(workloads::phase(&pod), "Succeeded", "{log}");
    assert!(log.contains("allocated 0.25 GiB"), "{log}");
    suite
        .cluster
        .check_running()
        .expect("every Tessera process still runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_sharing_mode_v1_31() {
    let version = "1.31".parse().expect("version");
    auto_sharing_mode(version, "auto-mode-v1.31", &[], "fixed slices").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "release matrix: make e2e-matrix"]
async fn auto_sharing_mode_v1_32() {
    let version = "1.32".parse().expect("version");
    auto_sharing_mode(version, "auto-mode-v1.32", &[], "fixed slices").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "release matrix: make e2e-matrix"]
async fn auto_sharing_mode_v1_33() {
    let version = "1.33".parse().expect("version");
    auto_sharing_mode(version, "auto-mode-v1.33", &[], "fixed slices").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "release matrix: make e2e-matrix"]
async fn auto_sharing_mode_v1_33_v1beta2() {
    let version = "1.33".parse().expect("version");
    let v1beta2 = ["resource.k8s.io/v1beta2=true"];
    auto_sharing_mode(version, "auto-mode-v1.33-v1beta2", &v1beta2, "partitioned").await;
}

// The release matrix (`make e2e-matrix`): every pinned minor between the oldest and the newest,
// which the default run covers. Each needs its own control-plane build (~10 min on 2 cores),
// hence opt-in.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "release matrix: make e2e-matrix"]
async fn simulated_cluster_v1_32() {
    run_suite("1.32".parse().expect("version"), "sim-cluster-v1.32").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "release matrix: make e2e-matrix"]
async fn simulated_cluster_v1_33() {
    run_suite("1.33".parse().expect("version"), "sim-cluster-v1.33").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "release matrix: make e2e-matrix"]
async fn simulated_cluster_v1_34() {
    run_suite("1.34".parse().expect("version"), "sim-cluster-v1.34").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "release matrix: make e2e-matrix"]
async fn simulated_cluster_v1_35() {
    run_suite("1.35".parse().expect("version"), "sim-cluster-v1.35").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "release matrix: make e2e-matrix"]
async fn simulated_cluster_v1_36() {
    run_suite("1.36".parse().expect("version"), "sim-cluster-v1.36").await;
}

/// Issue 8 on the real control plane: three 6 GiB claims on gpu-node-c's 16 GiB T4, which the
/// node overcommits 1.25× (20 GiB offered; 18 GiB allocated). `spill-y` and `spill-z` opt in to
/// spilling, `spill-x` does not. In that order, each allocates its whole 6 GiB and holds it: Y
/// fits on the card, Z finds 4 GiB left beside X's reserve and spills 2 GiB to host memory, X
/// still gets its whole 6 GiB on the card. The plugin's metrics show each claim's spill; every
/// pod succeeds.
async fn oversubscribed_claims_spill_on_the_overcommitted_node(suite: &mut Suite) {
    for file in ["spill-go", "spill-y", "spill-z", "spill-x", "spill-release"] {
        let _ = std::fs::remove_file(suite.shared.join(file));
    }
    // (pod, opted in, file it waits for, file it touches once its 6 GiB are allocated). The test
    // writes `spill-go` once all three run, so every claim is prepared (X's admitted on an
    // empty card) before anyone allocates.
    let pods = [
        ("spill-y", true, "spill-go", "spill-y"),
        ("spill-z", true, "spill-y", "spill-z"),
        ("spill-x", false, "spill-z", "spill-x"),
    ];
    for (name, opted_in, wait_for, touch) in pods {
        let mut share = share("6Gi", 20, 3);
        share.gpu_config = opted_in.then(|| json!({ "oversubscribe": true }));
        let command = suite.worker(&[
            "--wait-for",
            &format!("/shared/{wait_for}"),
            "--allocate",
            "6Gi",
            "--step",
            "1Gi",
            "--touch",
            &format!("/shared/{touch}"),
            "--hold-until",
            "/shared/spill-release",
        ]);
        suite.submit(name, &t4(), &share, command, &[]).await;
        // One at a time, as users' pods arrive: three created together for 18 of the 20 GiB
        // once left the third unschedulable on 1.37 ("cannot allocate all claims" with 12 GiB
        // allocated, while the first two allocations were in flight), and the scheduler retries
        // such a pod only on the next claim or slice change.
        suite.allocated_claim(name).await;
    }
    for (name, ..) in pods {
        let pod = suite
            .wait(name, "running", |p| workloads::phase(p) == "Running")
            .await;
        assert_eq!(workloads::node_name(&pod), "gpu-node-c", "{name}");
    }
    std::fs::write(suite.shared.join("spill-go"), b"").expect("go");
    suite
        .wait_file(&suite.shared.join("spill-x"), true, "X allocated its 6 GiB")
        .await;

    let port = suite.cluster.node("gpu-node-c").metrics_port;
    let usage = claim_usage(port).await.expect("plugin metrics");
    let mut seen = Vec::new();
    for (name, ..) in pods {
        let claim = suite.allocated_claim(name).await;
        let claim_name = claim["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let u = usage
            .iter()
            .find(|u| u.claim == claim_name)
            .unwrap_or_else(|| {
                panic!(
                    "{}: no metrics for {name}'s claim: {usage:?}",
                    suite.version
                )
            });
        seen.push((name, u.memory_limit, u.memory_used, u.memory_spilled));
    }
    assert_eq!(
        seen,
        vec![
            ("spill-y", 6 << 30, 6 << 30, 0),
            ("spill-z", 6 << 30, 6 << 30, 2 << 30),
            ("spill-x", 6 << 30, 6 << 30, 0),
        ],
        "{}: (pod, limit, used, spilled): Y on the card, Z 2 GiB spilled, X whole on the card",
        suite.version
    );

    std::fs::write(suite.shared.join("spill-release"), b"").expect("release");
    for (name, ..) in pods {
        let pod = suite.finished(name).await;
        let log = suite.log(&pod, "main");
        assert_eq!(workloads::phase(&pod), "Succeeded", "{name}:\n{log}");
        assert!(log.contains("allocated 6.00 GiB"), "{name}:\n{log}");
        suite.delete_pod(name).await;
    }
}

/// A claim that may not spill arrives on gpu-node-c while an opted-in claim holds 10 of the T4's
/// 16 GiB on the card: its 8 GiB are not free, so the plugin holds its preparation back (the pod
/// waits in ContainerCreating with the figures) until the opted-in claim ends; then it runs
/// with its whole share on the card.
async fn a_claim_that_may_not_spill_waits_for_its_share_of_the_card(suite: &mut Suite) {
    for file in ["hog-done", "hog-release"] {
        let _ = std::fs::remove_file(suite.shared.join(file));
    }
    let mut hog = share("10Gi", 20, 5);
    hog.gpu_config = Some(json!({ "oversubscribe": true }));
    let command = suite.worker(&[
        "--allocate",
        "10Gi",
        "--step",
        "1Gi",
        "--touch",
        "/shared/hog-done",
        "--hold-until",
        "/shared/hog-release",
    ]);
    suite.submit("spill-hog", &t4(), &hog, command, &[]).await;
    suite
        .wait_file(
            &suite.shared.join("hog-done"),
            true,
            "the opted-in claim holds 10 GiB",
        )
        .await;

    let command = suite.worker(&["--allocate", "8Gi", "--step", "1Gi"]);
    suite
        .submit("waits-for-card", &t4(), &share("8Gi", 20, 4), command, &[])
        .await;
    let waiting = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|c| c.state.as_ref()?.waiting.as_ref()?.message.clone())
            .any(|m| m.contains("is overcommitted and its card has 6.00 GiB free"))
    };
    let pod = suite
        .wait("waits-for-card", "held back for card room", waiting)
        .await;
    assert_eq!(workloads::phase(&pod), "Pending");

    std::fs::write(suite.shared.join("hog-release"), b"").expect("release");
    let hog = suite.finished("spill-hog").await;
    assert_eq!(workloads::phase(&hog), "Succeeded");
    let pod = suite.finished("waits-for-card").await;
    let log = suite.log(&pod, "main");
    assert_eq!(workloads::phase(&pod), "Succeeded", "{log}");
    assert!(
        log.contains("cuMemGetInfo: 8.00 GiB free of 8.00 GiB")
            && log.contains("allocated 8.00 GiB"),
        "its whole share, on the card:\n{log}"
    );
    for name in ["spill-hog", "waits-for-card"] {
        suite.delete_pod(name).await;
    }
}
