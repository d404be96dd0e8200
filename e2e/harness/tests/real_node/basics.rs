//! The upstream kubelet with containerd 2 and runc, joined to the harness's control plane: the
//! node becomes Ready, runs a pod from a locally imported image, and the apiserver reads the
//! pod's log from the kubelet over TLS with the harness's certificates; no process of the
//! cluster or the node opens a socket off loopback meanwhile. Then `tessera-kubelet-plugin`,
//! run on the host (standalone CDI, the fake GPU driver), registers with the real kubelet
//! through its plugin watcher, and a pod with a ResourceClaim is prepared by the kubelet over
//! DRA and started by containerd with the claim's CDI edits.

use std::time::{Duration, Instant};

use std::path::Path;

use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, LogParams, PostParams};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use serde_json::json;
use tessera_e2e_harness::K8sVersion;
use tessera_e2e_harness::cluster::default_sharing_mode;
use tessera_e2e_harness::cluster::workspace::{Artifacts, bin_dir};
use tessera_e2e_harness::ports::free_ports;
use tessera_e2e_harness::process::{Process, ProcessSpec, log_tail};
use tessera_e2e_harness::realnode::{BUSYBOX_IMAGE, RealNode};
use tessera_e2e_harness::workloads::{self, Selection, Share};

use crate::support::*;

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

    // An image the node does not have, never pulled: the kubelet names it in an Event, and
    // the pod waits with the reason (no silent hang). What a user sees when Tessera's images
    // were not loaded onto a node.
    let missing = "localhost/tessera/tessera-kubelet-plugin:0.0.0-missing";
    let mut pod = plain_pod("no-image");
    if let Some(c) = pod.spec.as_mut().and_then(|s| s.containers.first_mut()) {
        c.image = Some(missing.to_owned());
    }
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("creating pod no-image");
    let events: Api<Event> = Api::namespaced(control_plane.client(), "default");
    let start = Instant::now();
    loop {
        let notes: Vec<String> = events
            .list(&ListParams::default())
            .await
            .expect("listing events")
            .items
            .into_iter()
            .filter(|e| {
                e.involved_object.name.as_deref() == Some("no-image")
                    && e.reason.as_deref() == Some("ErrImageNeverPull")
            })
            .filter_map(|e| e.message)
            .collect();
        if notes.iter().any(|n| n.contains(missing)) {
            break;
        }
        assert!(
            start.elapsed() < POD_TIMEOUT,
            "no ErrImageNeverPull Event naming {missing}: {notes:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The pod's status follows the Event.
    let start = Instant::now();
    loop {
        let waiting = pods
            .get("no-image")
            .await
            .expect("reading pod no-image")
            .status
            .and_then(|s| s.container_statuses)
            .and_then(|c| c.first().and_then(|c| c.state.clone()))
            .and_then(|s| s.waiting)
            .and_then(|w| w.reason);
        if waiting.as_deref() == Some("ErrImageNeverPull") {
            break;
        }
        assert!(
            start.elapsed() < POD_TIMEOUT,
            "pod no-image waits with {waiting:?}, not ErrImageNeverPull"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    pods.delete("no-image", &DeleteParams::default())
        .await
        .expect("deleting pod no-image");
    wait_gone(&pods, "no-image", node).await;

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

/// `tessera-kubelet-plugin` as a host process for the real node (standalone CDI, the fake
/// driver under `gpu_root`).
struct HostPlugin<'a> {
    setup: &'a Setup,
    artifacts: &'a Artifacts,
    gpu_root: &'a Path,
    inventory: &'a Path,
    version: K8sVersion,
}

impl HostPlugin<'_> {
    /// Starts one instance: `instance` names its sockets (`--instance-id`), `plugin_dir`
    /// replaces the kubelet's plugin directory.
    fn start(&self, instance: Option<&str>, plugin_dir: Option<&Path>) -> Process {
        let node = &self.setup.node;
        let control_plane = &self.setup.control_plane;
        let metrics_port = free_ports(1).expect("a port")[0];
        let os = |s: &dyn AsRef<std::ffi::OsStr>| s.as_ref().to_owned();
        let plugin_dir = plugin_dir
            .map(Path::to_path_buf)
            .unwrap_or_else(|| node.kubelet_root().join("plugins/gpu.tessera.dev"));
        let mut args = vec![
            os(&"--node-name"),
            os(&node.name()),
            os(&"--kubeconfig"),
            os(&control_plane.kubeconfig()),
            os(&"--sharing-mode"),
            os(&default_sharing_mode(self.version)),
            os(&"--registrar-dir"),
            os(&node.plugins_registry()),
            os(&"--plugin-dir"),
            os(&plugin_dir),
            os(&"--cdi-dir"),
            os(&node.cdi_dir()),
            os(&"--state-dir"),
            os(&self.gpu_root.join("tessera")),
            os(&"--inventory"),
            os(&self.inventory),
            os(&"--shim-path"),
            os(&self.artifacts.shim),
            os(&"--cdi-mode"),
            os(&"standalone"),
            os(&"--driver-root"),
            os(&self.gpu_root.join("driver")),
            os(&"--dev-root"),
            os(&self.gpu_root.join("devroot")),
            os(&"--metrics-address"),
            os(&format!("127.0.0.1:{metrics_port}")),
        ];
        if let Some(id) = instance {
            args.extend([os(&"--instance-id"), os(&id)]);
        }
        let name = match instance {
            Some(id) => format!("kubelet-plugin-{id}"),
            None => "kubelet-plugin".to_owned(),
        };
        Process::spawn(ProcessSpec {
            name: name.clone(),
            program: self.artifacts.kubelet_plugin.clone(),
            args,
            log: control_plane.state().log(&name),
            pid_file: control_plane.state().pid_file(&name),
            env: Vec::new(),
        })
        .expect("starting tessera-kubelet-plugin")
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
    let Some(artifacts) = required(&test, Artifacts::locate(&bin_dir())) else {
        return;
    };
    let client = control_plane.client();
    let gpu_root = node.root().join("gpu");
    let inventory =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../nodes/gpu-node-b.json");
    fake_driver(&gpu_root, &artifacts, 1);

    let api_version = version.resource_api_version();
    let class_resource = version.resource_api("DeviceClass", "deviceclasses");
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

    let mut plugin = HostPlugin {
        setup: &setup,
        artifacts: &artifacts,
        gpu_root: &gpu_root,
        inventory: &inventory,
        version,
    }
    .start(None, None);
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

    let slices_resource = version.resource_api("ResourceSlice", "resourceslices");
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

/// Events on the Node with `reason`, as `kubectl describe node` lists them: their notes.
async fn node_events(client: &kube::Client, node: &str, reason: &str) -> Vec<String> {
    let events: Api<Event> = Api::all(client.clone());
    events
        .list(&ListParams::default())
        .await
        .expect("listing events")
        .items
        .into_iter()
        .filter(|e| {
            e.involved_object.kind.as_deref() == Some("Node")
                && e.involved_object.name.as_deref() == Some(node)
                && e.reason.as_deref() == Some(reason)
        })
        .map(|e| e.message.unwrap_or_default())
        .collect()
}

/// What stops the plugin is named in its log and in an Event on the Node: a socket directory
/// it cannot create, and a registration the real kubelet refuses (before 1.33 the kubelet takes
/// one registration per driver, so a second instance is refused; from 1.33 it is taken).
async fn reports_failures_as_events(version: K8sVersion) {
    let Some(setup) = setup(version, "real_node_failure_events", 3).await else {
        return;
    };
    let (test, began) = (setup.test.clone(), setup.began);
    let node = &setup.node;
    let client = setup.control_plane.client();
    let Some(artifacts) = required(&test, Artifacts::locate(&bin_dir())) else {
        return;
    };
    let gpu_root = node.root().join("gpu");
    let inventory =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../nodes/gpu-node-b.json");
    fake_driver(&gpu_root, &artifacts, 1);
    let plugins = HostPlugin {
        setup: &setup,
        artifacts: &artifacts,
        gpu_root: &gpu_root,
        inventory: &inventory,
        version,
    };

    // A socket directory under a regular file cannot be created.
    let blocker = node.root().join("not-a-directory");
    std::fs::write(&blocker, b"").expect("creating a file");
    let unusable = blocker.join("gpu.tessera.dev");
    let mut broken = plugins.start(Some("broken"), Some(&unusable));
    assert!(
        broken.wait_exit(Duration::from_secs(60)),
        "the plugin kept running without its socket directory:\n{}",
        log_tail(broken.log(), 20)
    );
    let log = std::fs::read_to_string(broken.log()).unwrap_or_default();
    let expected = format!("creating the socket directory {}", unusable.display());
    assert!(
        log.contains(&expected),
        "the log does not name the directory ({expected:?}):\n{log}"
    );
    let notes = node_events(&client, node.name(), "PluginFailed").await;
    assert!(
        notes.iter().any(|n| n.contains(&expected)),
        "no PluginFailed Event naming {}: {notes:?}",
        unusable.display()
    );

    let mut first = plugins.start(Some("first"), None);
    wait_for_log(
        &mut first,
        "registered with the kubelet",
        "the first instance",
        node,
    )
    .await;
    let mut second = plugins.start(Some("second"), None);
    if version.minor() < 33 {
        wait_for_log(
            &mut second,
            "the kubelet refused the registration",
            "the second instance, refused by a kubelet before 1.33",
            node,
        )
        .await;
        let start = Instant::now();
        loop {
            let notes = node_events(&client, node.name(), "RegistrationRefused").await;
            if notes
                .iter()
                .any(|n| n.contains("the kubelet refused the registration of gpu.tessera.dev: "))
            {
                break;
            }
            assert!(
                start.elapsed() < POD_TIMEOUT,
                "no RegistrationRefused Event on the Node: {notes:?}\nplugin log:\n{}",
                log_tail(second.log(), 20)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    } else {
        wait_for_log(
            &mut second,
            "registered with the kubelet",
            "the second instance, beside the first (kubelet 1.33+)",
            node,
        )
        .await;
        let notes = node_events(&client, node.name(), "RegistrationRefused").await;
        assert!(notes.is_empty(), "refused on {version}: {notes:?}");
    }
    drop((first, second));
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
async fn real_node_failure_events_v1_37() {
    reports_failures_as_events(K8sVersion::newest()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_node_failure_events_v1_31() {
    reports_failures_as_events(tessera_e2e_harness::versions::PINNED[0]).await;
}
