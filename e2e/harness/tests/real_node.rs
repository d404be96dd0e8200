//! A real node: the upstream kubelet with containerd 2 and runc, joined to the harness's control
//! plane. The node becomes Ready, runs a pod from a locally imported image, and the apiserver
//! reads the pod's log from the kubelet over TLS with the harness's certificates; no process of
//! the cluster or the node opens a socket off loopback meanwhile.
//!
//! Then Tessera on it: `tessera-kubelet-plugin` (standalone CDI, the fake GPU driver) registers
//! with the real kubelet through its plugin watcher, and a pod with a ResourceClaim is prepared
//! by the kubelet over DRA and started by containerd with the claim's CDI edits.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, LogParams, Patch,
    PatchParams, PostParams,
};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use serde_json::json;
use tessera_built_libs::require;
use tessera_chart_tests::{Helm, Release, install};
use tessera_e2e_harness::cluster::default_sharing_mode;
use tessera_e2e_harness::cluster::workspace::{Artifacts, bin_dir};
use tessera_e2e_harness::images::{REGISTRY, debug_images};
use tessera_e2e_harness::ports::free_ports;
use tessera_e2e_harness::process::{Process, ProcessSpec, log_tail};
use tessera_e2e_harness::realnode::{
    BUSYBOX_IMAGE, NodeBinaries, OffLoopback, PidFinder, RealNode, RealNodeOptions,
    sockets_off_loopback,
};
use tessera_e2e_harness::workloads::{self, Selection, Share};
use tessera_e2e_harness::{ControlPlane, ControlPlaneOptions, K8sVersion};

const POD_TIMEOUT: Duration = Duration::from_secs(120);

/// Samples the sockets of every process of the cluster and the node until dropped; what it saw
/// off loopback is kept.
struct LoopbackWatch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<HashSet<OffLoopback>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LoopbackWatch {
    fn start(control_plane_pids: Vec<i32>, node: PidFinder) -> LoopbackWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(HashSet::new()));
        let thread = {
            let stop = stop.clone();
            let seen = seen.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let mut pids = control_plane_pids.clone();
                    pids.extend(node.pids());
                    let found = sockets_off_loopback(&pids);
                    seen.lock().expect("watch lock").extend(found);
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        LoopbackWatch {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// Stops sampling; returns everything seen off loopback.
    fn finish(mut self) -> Vec<OffLoopback> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut seen: Vec<_> = self.seen.lock().expect("watch lock").drain().collect();
        seen.sort_by_key(|o| (o.pid, o.local.clone(), o.remote.clone()));
        seen
    }

    /// Stops sampling and fails the test, listing them, if any socket was off loopback.
    fn assert_nothing_left_loopback(self) {
        let off_loopback = self.finish();
        assert!(
            off_loopback.is_empty(),
            "sockets off loopback:\n{}",
            off_loopback
                .iter()
                .map(|o| format!("  {o}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

impl Drop for LoopbackWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn plain_pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": "default" },
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "main",
                "image": BUSYBOX_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["/bin/sh", "-c", "echo \"hello from $(hostname), uid $(id -u)\""],
            }],
        },
    }))
    .expect("pod object")
}

/// Waits for one of `phases`; the panic shows the pod's status and the kubelet's log tail.
async fn wait_for_phase(pods: &Api<Pod>, name: &str, phases: &[&str], node: &RealNode) -> Pod {
    let start = Instant::now();
    loop {
        let pod = pods.get(name).await.expect("reading pod");
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        if phases.contains(&phase.as_str()) {
            return pod;
        }
        if start.elapsed() > POD_TIMEOUT {
            panic!(
                "pod {name} is {phase:?}, not one of {phases:?}, after {POD_TIMEOUT:?}; status: {:#?}\nkubelet log ({}):\n{}",
                pod.status,
                node.kubelet_log().display(),
                node.kubelet_log_tail(60)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_gone(pods: &Api<Pod>, name: &str, node: &RealNode) {
    let start = Instant::now();
    while pods.get_opt(name).await.expect("reading pod").is_some() {
        assert!(
            start.elapsed() < POD_TIMEOUT,
            "pod {name} not gone after {POD_TIMEOUT:?}; kubelet log:\n{}",
            node.kubelet_log_tail(60)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A control plane and a real node, or `None` where the test cannot run (see `require`).
/// Fields drop in reverse order: the node before the control plane, the directory last.
struct Setup {
    test: String,
    began: Instant,
    node: RealNode,
    control_plane: ControlPlane,
    _state: common::StateDir,
}

async fn setup(version: K8sVersion, name: &str, kubelet_verbosity: u8) -> Option<Setup> {
    let test = format!("{name}_{}", version.dir_name().replace('.', "_"));
    let binaries = common::binaries_or_skip(version, &test)?;
    let node_binaries = NodeBinaries::locate(&binaries);
    require(&test, node_binaries.is_ok(), || {
        node_binaries
            .as_ref()
            .err()
            .map(ToString::to_string)
            .unwrap_or_default()
    })?;
    let node_binaries = node_binaries.expect("checked above");
    common::init_tracing();
    let began = Instant::now();
    let state = common::StateDir::new(&test);
    let control_plane = ControlPlane::start(ControlPlaneOptions {
        binaries: Some(binaries),
        ..ControlPlaneOptions::new(version, state.path())
    })
    .await
    .unwrap_or_else(|e| panic!("starting the control plane: {e}"));
    let node = RealNode::start(
        &control_plane,
        RealNodeOptions {
            kubelet_verbosity,
            keep_dir: std::env::var("TESSERA_E2E_KEEP").as_deref() == Ok("1"),
            ..RealNodeOptions::new(node_binaries)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("starting the real node: {e}"));
    eprintln!(
        "{test}: node {} Ready {:.1}s after the kubelet started ({:.1}s after the test began)",
        node.name(),
        node.ready_in().as_secs_f64(),
        began.elapsed().as_secs_f64()
    );
    Some(Setup {
        test,
        began,
        node,
        control_plane,
        _state: state,
    })
}

/// Stops the node and checks that it left no mount behind.
fn stop_node(node: RealNode) {
    let root = node.root().to_owned();
    let problems = node.stop();
    assert!(problems.is_empty(), "stopping the node: {problems:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let left: Vec<&str> = mounts
        .lines()
        .filter(|l| l.contains(&*root.to_string_lossy()))
        .collect();
    assert!(
        left.is_empty(),
        "mounts left under {}: {left:#?}",
        root.display()
    );
}

async fn runs_a_pod(version: K8sVersion) {
    // Not destructured: on a panic the fields drop in declaration order, node first.
    let Some(setup) = setup(version, "real_node_runs_a_pod", 2).await else {
        return;
    };
    let (test, began) = (setup.test.clone(), setup.began);
    let node = &setup.node;
    let control_plane = &setup.control_plane;
    let watch = LoopbackWatch::start(
        control_plane
            .record()
            .components
            .iter()
            .map(|c| c.pid)
            .collect(),
        node.pid_finder(),
    );

    let pods: Api<Pod> = Api::namespaced(control_plane.client(), "default");
    pods.create(&PostParams::default(), &plain_pod("hello"))
        .await
        .expect("creating pod hello");
    let pod = wait_for_phase(&pods, "hello", &["Succeeded", "Failed"], node).await;
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    assert_eq!(
        phase,
        Some("Succeeded"),
        "status: {:#?}\nkubelet log:\n{}",
        pod.status,
        node.kubelet_log_tail(60)
    );
    assert_eq!(
        pod.spec.as_ref().and_then(|s| s.node_name.as_deref()),
        Some(node.name())
    );
    // The apiserver fetches this from the kubelet: its client certificate against the
    // kubelet's webhook authentication, the kubelet's serving certificate against our CA.
    let log = pods
        .logs("hello", &LogParams::default())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "pods/log of hello: {e}\nkubelet log:\n{}",
                node.kubelet_log_tail(40)
            )
        });
    assert_eq!(log.trim(), "hello from hello, uid 0");

    pods.delete("hello", &DeleteParams::default())
        .await
        .expect("deleting pod hello");
    wait_gone(&pods, "hello", node).await;

    watch.assert_nothing_left_loopback();

    stop_node(setup.node);
    eprintln!("{test}: passed in {:.1}s", began.elapsed().as_secs_f64());
}

/// The fake GPU driver as a GPU node has it: `libcuda.so.1` and `libnvidia-ml.so.1` under a
/// driver root, `/dev/nvidia*` (with `/dev/null`'s numbers) under a dev root.
fn fake_driver(root: &std::path::Path, artifacts: &Artifacts, gpus: usize) {
    let lib_dir = root.join("driver/usr/lib/x86_64-linux-gnu");
    let dev_dir = root.join("devroot/dev");
    for dir in [&lib_dir, &dev_dir, &root.join("tessera")] {
        std::fs::create_dir_all(dir).expect("creating the fake driver's directories");
    }
    for (target, link) in [
        (&artifacts.fake_cuda, "libcuda.so.1"),
        (&artifacts.fake_nvml, "libnvidia-ml.so.1"),
    ] {
        std::os::unix::fs::symlink(target, lib_dir.join(link)).expect("linking the fake driver");
    }
    let nodes = (0..gpus)
        .map(|i| format!("nvidia{i}"))
        .chain(["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"].map(String::from));
    for node in nodes {
        mknod(
            &dev_dir.join(&node),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(1, 3),
        )
        .expect("creating a fake device node");
    }
}

async fn wait_for_log(process: &mut Process, needle: &str, what: &str, node: &RealNode) {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(process.log()).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        let registration_errors: Vec<String> = std::fs::read_to_string(node.kubelet_log())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("RegisterPlugin error"))
            .take(3)
            .map(str::to_owned)
            .collect();
        if let Err(e) = process.check_running() {
            panic!("{what}: {e}");
        }
        assert!(
            start.elapsed() < POD_TIMEOUT,
            "{what}: no {needle:?} in {} after {POD_TIMEOUT:?}; its log:\n{}\nthe kubelet's registration errors:\n{}\nkubelet log ({}):\n{}",
            process.log().display(),
            log_tail(process.log(), 30),
            registration_errors.join("\n"),
            node.kubelet_log().display(),
            node.kubelet_log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn prepares_a_claim(version: K8sVersion) {
    // The kubelet logs its DRA plugin registrations at level 3.
    let Some(setup) = setup(version, "real_node_prepares_a_claim", 3).await else {
        return;
    };
    let (test, began) = (setup.test.clone(), setup.began);
    let node = &setup.node;
    let control_plane = &setup.control_plane;
    let artifacts = Artifacts::locate(&bin_dir());
    let Some(()) = require(&test, artifacts.is_ok(), || {
        artifacts
            .as_ref()
            .err()
            .map(ToString::to_string)
            .unwrap_or_default()
    }) else {
        return;
    };
    let artifacts = artifacts.expect("checked above");
    let client = control_plane.client();
    let gpu_root = node.root().join("gpu");
    let inventory =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../nodes/gpu-node-b.json");
    fake_driver(&gpu_root, &artifacts, 1);

    let api_version = version.resource_api_version();
    let class_resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("resource.k8s.io", api_version, "DeviceClass"),
        "deviceclasses",
    );
    let class: DynamicObject = serde_json::from_value(json!({
        "apiVersion": format!("resource.k8s.io/{api_version}"),
        "kind": "DeviceClass",
        "metadata": { "name": "gpu.tessera.dev" },
        "spec": { "selectors": [{ "cel": { "expression": "device.driver == \"gpu.tessera.dev\"" } }] },
    }))
    .expect("DeviceClass object");
    Api::<DynamicObject>::all_with(client.clone(), &class_resource)
        .create(&PostParams::default(), &class)
        .await
        .expect("creating DeviceClass gpu.tessera.dev");

    let metrics_port = free_ports(1).expect("a port")[0];
    let os = |s: &dyn AsRef<std::ffi::OsStr>| s.as_ref().to_owned();
    let mut plugin = Process::spawn(ProcessSpec {
        name: "tessera-kubelet-plugin".into(),
        program: artifacts.kubelet_plugin.clone(),
        args: vec![
            os(&"--node-name"),
            os(&node.name()),
            os(&"--kubeconfig"),
            os(&control_plane.kubeconfig()),
            os(&"--sharing-mode"),
            os(&default_sharing_mode(version)),
            os(&"--registrar-dir"),
            os(&node.plugins_registry()),
            os(&"--plugin-dir"),
            os(&node.kubelet_root().join("plugins/gpu.tessera.dev")),
            os(&"--cdi-dir"),
            os(&node.cdi_dir()),
            os(&"--state-dir"),
            os(&gpu_root.join("tessera")),
            os(&"--inventory"),
            os(&inventory),
            os(&"--shim-path"),
            os(&artifacts.shim),
            os(&"--cdi-mode"),
            os(&"standalone"),
            os(&"--driver-root"),
            os(&gpu_root.join("driver")),
            os(&"--dev-root"),
            os(&gpu_root.join("devroot")),
            os(&"--metrics-address"),
            os(&format!("127.0.0.1:{metrics_port}")),
        ],
        log: control_plane.state().log("kubelet-plugin"),
        pid_file: control_plane.state().pid_file("kubelet-plugin"),
    })
    .expect("starting tessera-kubelet-plugin");
    let watch = LoopbackWatch::start(
        control_plane
            .record()
            .components
            .iter()
            .map(|c| c.pid)
            .chain([plugin.pid()])
            .collect(),
        node.pid_finder(),
    );

    // Registration goes through the kubelet's plugin watcher: GetInfo on the registration
    // socket (dialled by grpc-go with the socket path as its authority), then
    // NotifyRegistrationStatus.
    wait_for_log(
        &mut plugin,
        "registered with the kubelet",
        "tessera-kubelet-plugin registering with the real kubelet",
        node,
    )
    .await;
    let kubelet_log = std::fs::read_to_string(node.kubelet_log()).expect("kubelet log");
    assert!(
        kubelet_log
            .lines()
            // 1.37 logs the first after validating the plugin's versions, 1.31 the second.
            .any(|l| (l.contains("Registered DRA plugin")
                || l.contains("Register new DRA plugin"))
                && l.contains("gpu.tessera.dev")),
        "the kubelet did not log the DRA plugin's registration; its log:\n{}",
        node.kubelet_log_tail(40)
    );

    let slices_resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("resource.k8s.io", api_version, "ResourceSlice"),
        "resourceslices",
    );
    let slices: Api<DynamicObject> = Api::all_with(client.clone(), &slices_resource);
    let start = Instant::now();
    loop {
        let list = slices
            .list(&ListParams::default())
            .await
            .expect("listing ResourceSlices");
        if list
            .items
            .iter()
            .any(|s| s.data["spec"]["nodeName"].as_str() == Some(node.name()))
        {
            break;
        }
        assert!(
            start.elapsed() < POD_TIMEOUT,
            "no ResourceSlice for node {}; plugin log:\n{}",
            node.name(),
            log_tail(plugin.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let share = Share {
        memory: "2Gi".into(),
        cores: 25,
        tenths: 2,
        gpu_config: None,
    };
    let template = workloads::claim_template(
        version,
        "default",
        "one-gpu",
        &Selection::class("gpu.tessera.dev"),
        &share,
    );
    workloads::create(&client, &template)
        .await
        .expect("creating ResourceClaimTemplate one-gpu");
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "gpu-pod", "namespace": "default" },
        "spec": {
            "restartPolicy": "Never",
            "resourceClaims": [{ "name": "gpu", "resourceClaimTemplateName": "one-gpu" }],
            "containers": [{
                "name": "main",
                "image": BUSYBOX_IMAGE,
                "imagePullPolicy": "Never",
                // busybox is static: the preloaded shim does not load into it, so this only
                // shows what the CDI spec put in the container.
                "command": ["/bin/sh", "-c",
                    "echo \"config=$TESSERA_CONFIG\"; echo \"preload=$(cat /etc/ld.so.preload)\"; \
                     for f in $(cat /etc/ld.so.preload) \"$TESSERA_CONFIG\" /dev/nvidia0 /dev/nvidiactl; do \
                       [ -e \"$f\" ] && echo \"present $f\" || echo \"missing $f\"; done"],
                "resources": { "claims": [{ "name": "gpu" }] },
            }],
        },
    }))
    .expect("pod object");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("creating pod gpu-pod");
    let pod = wait_for_phase(&pods, "gpu-pod", &["Succeeded", "Failed"], node).await;
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    let log = pods
        .logs("gpu-pod", &LogParams::default())
        .await
        .unwrap_or_else(|e| panic!("pods/log of gpu-pod: {e}"));
    assert_eq!(
        phase,
        Some("Succeeded"),
        "status: {:#?}\noutput:\n{log}\nplugin log:\n{}\nkubelet log:\n{}",
        pod.status,
        log_tail(plugin.log(), 30),
        node.kubelet_log_tail(40)
    );
    let lines: Vec<&str> = log.lines().collect();
    let config = lines
        .iter()
        .find_map(|l| l.strip_prefix("config="))
        .unwrap_or_default();
    let preload = lines
        .iter()
        .find_map(|l| l.strip_prefix("preload="))
        .unwrap_or_default();
    assert!(
        !config.is_empty(),
        "no TESSERA_CONFIG in the container:\n{log}"
    );
    assert!(
        preload.ends_with("libtessera.so"),
        "/etc/ld.so.preload does not name the shim:\n{log}"
    );
    assert!(
        !lines.iter().any(|l| l.starts_with("missing ")),
        "the CDI edits are incomplete:\n{log}"
    );
    let plugin_log = std::fs::read_to_string(plugin.log()).unwrap_or_default();
    assert!(
        plugin_log.contains("prepared claim"),
        "the plugin logged no prepare call:\n{}",
        log_tail(plugin.log(), 30)
    );

    pods.delete("gpu-pod", &DeleteParams::default())
        .await
        .expect("deleting pod gpu-pod");
    wait_gone(&pods, "gpu-pod", node).await;
    watch.assert_nothing_left_loopback();
    drop(plugin);
    stop_node(setup.node);
    eprintln!("{test}: passed in {:.1}s", began.elapsed().as_secs_f64());
}

/// The fake driver as the GPU Operator's driver root has it, for the chart's plugin pod, which
/// sees only what is mounted into it: the libraries copied (not linked) under
/// `<driver>/usr/lib/x86_64-linux-gnu`, the device nodes under `<driver>/dev`.
fn fake_driver_root(driver: &std::path::Path, artifacts: &Artifacts) {
    let lib_dir = driver.join("usr/lib/x86_64-linux-gnu");
    let dev_dir = driver.join("dev");
    for dir in [&lib_dir, &dev_dir] {
        std::fs::create_dir_all(dir).expect("creating the fake driver root");
    }
    for (from, name) in [
        (&artifacts.fake_cuda, "libcuda.so.1"),
        (&artifacts.fake_nvml, "libnvidia-ml.so.1"),
    ] {
        std::fs::copy(from, lib_dir.join(name)).expect("copying the fake driver");
    }
    let nodes = (0..8)
        .map(|i| format!("nvidia{i}"))
        .chain(["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"].map(String::from));
    for node in nodes {
        mknod(
            &dev_dir.join(&node),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(1, 3),
        )
        .expect("creating a fake device node");
    }
}

/// Polls `check` (which says what it is waiting for when not yet done) until it is done; the
/// panic names the last state and the kubelet's log tail.
async fn wait_until<F, Fut>(what: &str, node: &RealNode, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let start = Instant::now();
    loop {
        let last = match check().await {
            Ok(()) => return,
            Err(state) => state,
        };
        if start.elapsed() > POD_TIMEOUT {
            panic!(
                "{what}: not after {POD_TIMEOUT:?}; last: {last}\ncontainer logs:\n{}\nkubelet log ({}):\n{}",
                container_logs_tail(node, 15),
                node.kubelet_log().display(),
                node.kubelet_log_tail(40)
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The last lines of every container log on the node (`<node>/pod-logs/<pod>/<container>/N.log`).
fn container_logs_tail(node: &RealNode, lines: usize) -> String {
    let mut out = String::new();
    let pods = std::fs::read_dir(node.root().join("pod-logs"))
        .into_iter()
        .flatten();
    for pod in pods.flatten() {
        let containers = std::fs::read_dir(pod.path()).into_iter().flatten();
        for container in containers.flatten() {
            let logs = std::fs::read_dir(container.path()).into_iter().flatten();
            for log in logs.flatten() {
                out.push_str(&format!(
                    "--- {}\n{}\n",
                    log.path().display(),
                    log_tail(&log.path(), lines)
                ));
            }
        }
    }
    out
}

fn pod_summary(pod: &Pod) -> String {
    let status = pod.status.clone().unwrap_or_default();
    let containers: Vec<String> = status
        .container_statuses
        .unwrap_or_default()
        .iter()
        .map(|c| {
            format!(
                "{} ready={} restarts={} state={}",
                c.name,
                c.ready,
                c.restart_count,
                serde_json::to_string(&c.state).unwrap_or_default()
            )
        })
        .collect();
    format!(
        "{} {} on {:?}: [{}]",
        pod.metadata.name.as_deref().unwrap_or_default(),
        status.phase.unwrap_or_default(),
        pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        containers.join("; ")
    )
}

fn all_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .is_some_and(|cs| !cs.is_empty() && cs.iter().all(|c| c.ready))
}

/// A pod of the workload image: `tessera-gpu-worker` with `args`, on one claim.
fn worker_pod(name: &str, image: &str, template: &str, args: &[&str]) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": "default" },
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 2,
            "resourceClaims": [{ "name": "gpu", "resourceClaimTemplateName": template }],
            "containers": [{
                "name": "worker",
                "image": image,
                "imagePullPolicy": "Never",
                "args": args,
                "resources": { "claims": [{ "name": "gpu" }] },
            }],
        },
    }))
    .expect("pod object")
}

/// Tessera as a user installs it: Tessera's images (built here, imported into the node's
/// containerd) and the Helm chart, unchanged in shape. The chart's plugin DaemonSet runs on the
/// real node (privileged, host paths), registers with the real kubelet and publishes the node's
/// slices from NVML; the controller Deployment's pods become Ready (the kubelet probes them on
/// the pod network); and a pod of the workload image, holding only the test CUDA program,
/// gets the shim, its config and the driver through the CDI spec alone: it sees its slice and
/// hits the wall.
async fn the_chart_runs_on_the_node(version: K8sVersion) {
    let Some(setup) = setup(version, "real_node_chart", 3).await else {
        return;
    };
    let (test, began) = (setup.test.clone(), setup.began);
    let node = &setup.node;
    let client = setup.control_plane.client();
    let artifacts = Artifacts::locate(&bin_dir());
    let helm = Helm::locate();
    let Some(()) = require(&test, artifacts.is_ok() && helm.is_ok(), || {
        format!(
            "{}{}",
            artifacts
                .as_ref()
                .err()
                .map(ToString::to_string)
                .unwrap_or_default(),
            helm.as_ref()
                .err()
                .map(ToString::to_string)
                .unwrap_or_default()
        )
    }) else {
        return;
    };
    let (artifacts, helm) = (artifacts.expect("checked"), helm.expect("checked"));
    let images = debug_images().unwrap_or_else(|e| panic!("making Tessera's images: {e}"));
    let tarballs: Vec<&std::path::Path> = images.iter().map(|i| i.tarball.as_path()).collect();
    node.import_images(&tarballs)
        .unwrap_or_else(|e| panic!("importing Tessera's images: {e}"));
    let image = |name: &str| {
        images
            .iter()
            .find(|i| i.name() == name)
            .unwrap_or_else(|| panic!("no image {name} in {images:?}"))
    };
    let worker_image = image("tessera-gpu-worker").reference.clone();
    let tag = image("tessera-kubelet-plugin").tag().to_owned();

    let driver_root = node.root().join("gpu/driver");
    fake_driver_root(&driver_root, &artifacts);
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch(
            node.name(),
            &PatchParams::default(),
            &Patch::Merge(
                json!({ "metadata": { "labels": { "gpu.tessera.dev/enabled": "true" } } }),
            ),
        )
        .await
        .expect("labelling the node");

    let values = json!({
        "image": { "registry": REGISTRY, "tag": tag, "pullPolicy": "Never" },
        "sharingMode": default_sharing_mode(version),
        "kubeletPlugin": {
            "driverRoot": driver_root,
            "cdiMode": "standalone",
            "kubeletRoot": node.kubelet_root(),
            "cdiDir": node.cdi_dir(),
            "stateDir": node.root().join("gpu/tessera"),
            "logFormat": "text",
            "extraArgs": [format!("--dev-root={}", driver_root.display())],
        },
        "controller": { "logFormat": "text" },
        "monitoring": { "enabled": false },
    });
    let namespace = "tessera-system";
    install(
        &client,
        &helm,
        &Release::new("tessera", namespace).values(&values.to_string()),
        None,
    )
    .await
    .unwrap_or_else(|e| panic!("installing the chart: {e}"));

    let system_pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let component_pods = |component: &'static str| {
        let system_pods = system_pods.clone();
        async move {
            system_pods
                .list(
                    &ListParams::default()
                        .labels(&format!("app.kubernetes.io/component={component}")),
                )
                .await
                .map(|l| l.items)
                .map_err(|e| e.to_string())
        }
    };
    wait_until("the plugin's pod Running on the node", node, || async {
        let pods = component_pods("kubelet-plugin").await?;
        match pods.as_slice() {
            [pod]
                if all_ready(pod)
                    && pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
                        == Some(node.name()) =>
            {
                Ok(())
            }
            other => Err(other
                .iter()
                .map(pod_summary)
                .collect::<Vec<_>>()
                .join(" | ")),
        }
    })
    .await;
    let kubelet_registered = || {
        std::fs::read_to_string(node.kubelet_log())
            .unwrap_or_default()
            .lines()
            .any(|l| {
                (l.contains("Registered DRA plugin") || l.contains("Register new DRA plugin"))
                    && l.contains("gpu.tessera.dev")
            })
    };
    wait_until("the kubelet registering the plugin", node, || async {
        kubelet_registered()
            .then_some(())
            .ok_or_else(|| "no registration in the kubelet's log".to_owned())
    })
    .await;

    let api_version = version.resource_api_version();
    let slices_resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("resource.k8s.io", api_version, "ResourceSlice"),
        "resourceslices",
    );
    let slices: Api<DynamicObject> = Api::all_with(client.clone(), &slices_resource);
    wait_until("a ResourceSlice of the node, from NVML", node, || async {
        let list = slices
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        let devices: usize = list
            .items
            .iter()
            .filter(|s| s.data["spec"]["nodeName"].as_str() == Some(node.name()))
            .map(|s| s.data["spec"]["devices"].as_array().map_or(0, Vec::len))
            .sum();
        (devices > 0).then_some(()).ok_or_else(|| {
            format!(
                "{} slices, none with devices for the node",
                list.items.len()
            )
        })
    })
    .await;
    wait_until("both controller pods Ready", node, || async {
        let pods = component_pods("controller").await?;
        if pods.len() == 2 && pods.iter().all(all_ready) {
            Ok(())
        } else {
            Err(pods.iter().map(pod_summary).collect::<Vec<_>>().join(" | "))
        }
    })
    .await;

    let share = Share {
        memory: "2Gi".into(),
        cores: 25,
        tenths: 2,
        gpu_config: None,
    };
    let template = workloads::claim_template(
        version,
        "default",
        "one-gpu",
        &Selection::class("gpu.tessera.dev"),
        &share,
    );
    workloads::create(&client, &template)
        .await
        .expect("creating ResourceClaimTemplate one-gpu");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let run_worker = |name: &'static str, args: Vec<String>| {
        let pods = pods.clone();
        let worker_image = worker_image.clone();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            pods.create(
                &PostParams::default(),
                &worker_pod(name, &worker_image, "one-gpu", &args),
            )
            .await
            .unwrap_or_else(|e| panic!("creating pod {name}: {e}"));
            let pod = wait_for_phase(&pods, name, &["Succeeded", "Failed"], node).await;
            let log = pods
                .logs(name, &LogParams::default())
                .await
                .unwrap_or_else(|e| panic!("pods/log of {name}: {e}"));
            (pod, log)
        }
    };
    // What the slice is differs by sharing mode (2 GiB, or 2 tenths of the card): read it.
    let (pod, log) = run_worker("sees-its-slice", vec!["--allocate".into(), "256Mi".into()]).await;
    assert_eq!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded"),
        "status: {}\noutput:\n{log}\nkubelet log:\n{}",
        pod_summary(&pod),
        node.kubelet_log_tail(40)
    );
    let total_gib: f64 = log
        .lines()
        .find_map(|l| l.split(" free of ").nth(1))
        .and_then(|t| t.trim().strip_suffix(" GiB"))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no cuMemGetInfo line in the worker's output:\n{log}"));
    assert!(
        total_gib > 0.0 && total_gib < 24.0,
        "cuMemGetInfo's total is {total_gib} GiB, not the slice's (the card has 24):\n{log}"
    );
    let beyond = format!("{}Mi", (total_gib * 1024.0) as u64 + 512);
    let (pod, log) = run_worker(
        "hits-the-wall",
        vec![
            "--allocate".into(),
            beyond.clone(),
            "--step".into(),
            "256Mi".into(),
        ],
    )
    .await;
    assert_eq!(
        workloads::exit_code(&pod, "worker"),
        Some(1),
        "allocating {beyond} in a {total_gib} GiB slice: {}\noutput:\n{log}",
        pod_summary(&pod)
    );
    assert!(
        log.contains("CUDA_ERROR_OUT_OF_MEMORY"),
        "the wall was not the driver's out-of-memory:\n{log}"
    );
    for name in ["sees-its-slice", "hits-the-wall"] {
        pods.delete(name, &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("deleting pod {name}: {e}"));
        wait_gone(&pods, name, node).await;
    }
    // The kubelet probed both kinds of pod over the pod network all along.
    for component in ["kubelet-plugin", "controller"] {
        for pod in component_pods(component)
            .await
            .expect("listing Tessera's pods")
        {
            let restarts: i32 = pod
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .map_or(0, |cs| cs.iter().map(|c| c.restart_count).sum());
            assert_eq!(restarts, 0, "{} restarted", pod_summary(&pod));
        }
    }
    stop_node(setup.node);
    eprintln!("{test}: passed in {:.1}s", began.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_node_runs_a_pod_v1_37() {
    runs_a_pod(K8sVersion::newest()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_node_prepares_a_claim_v1_37() {
    prepares_a_claim(K8sVersion::newest()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_node_runs_a_pod_v1_31() {
    runs_a_pod(tessera_e2e_harness::versions::PINNED[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_node_prepares_a_claim_v1_31() {
    prepares_a_claim(tessera_e2e_harness::versions::PINNED[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_node_chart_v1_37() {
    the_chart_runs_on_the_node(K8sVersion::newest()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_node_chart_v1_31() {
    the_chart_runs_on_the_node(tessera_e2e_harness::versions::PINNED[0]).await;
}
