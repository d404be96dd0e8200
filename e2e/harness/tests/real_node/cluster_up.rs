//! `tessera-cluster up` (what `make cluster-up` runs) brings up a real node beside the
//! simulated ones, with Tessera's plugin on it from the chart's DaemonSet, and leaves it
//! running after it exits; a pod runs there and its log comes back through the apiserver; `tessera-cluster down` stops the node's processes and leaves
//! no container, mount, cgroup or directory of it behind.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DynamicObject, ListParams, LogParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;
use tessera_e2e_harness::K8sVersion;
use tessera_e2e_harness::process::is_alive;
use tessera_e2e_harness::realnode::{BUSYBOX_IMAGE, NodeBinaries, tessera};
use tessera_e2e_harness::state::StateDir as ClusterState;

use crate::common;
use crate::support::{POD_TIMEOUT, required};

fn cluster(args: &[&str], state: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tessera-cluster"))
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .arg("--nodes")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../nodes"))
        .output()
        .expect("running tessera-cluster")
}

async fn up_and_down(version: K8sVersion) {
    let test = format!(
        "real_node_cluster_up_{}",
        version.dir_name().replace('.', "_")
    );
    let Some(binaries) = common::binaries_or_skip(version, &test) else {
        return;
    };
    if required(&test, NodeBinaries::locate(&binaries)).is_none() {
        return;
    }
    common::init_tracing();
    // A short directory: the simulated nodes' sockets live under it.
    let state = common::StateDir::new("cluster_up");
    let dir = state.path().to_owned();
    let version_arg = version.dir_name();
    let up = cluster(&["up", "--k8s-version", &version_arg], &dir);
    let stderr = String::from_utf8_lossy(&up.stderr).into_owned();
    // Whatever happens below, `down` runs.
    let guard = DownOnDrop(dir.clone());
    assert!(up.status.success(), "tessera-cluster up failed:\n{stderr}");
    let record = ClusterState::open(&dir)
        .and_then(|s| s.read_record())
        .expect("the cluster record");
    let [real] = record.real_nodes.as_slice() else {
        panic!("no real node in the record: {record:#?}\n{stderr}");
    };
    // Started, then left: `up` has exited and everything still runs.
    for c in &record.components {
        assert!(is_alive(c.pid), "{} (pid {}) is not running", c.name, c.pid);
    }

    let kubeconfig = Kubeconfig::read_from(&record.kubeconfig).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("client config");
    let client = kube::Client::try_from(config).expect("client");
    let nodes: Api<Node> = Api::all(client.clone());
    let names: Vec<String> = nodes
        .list(&Default::default())
        .await
        .expect("listing nodes")
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    assert!(
        names.contains(&real.name) && names.len() > 1,
        "the real node {} beside the simulated ones: {names:?}",
        real.name
    );

    // Tessera's plugin, the chart's DaemonSet with this build's images, runs there and has
    // published the node's GPUs.
    let plugin_pods: Api<Pod> = Api::namespaced(client.clone(), tessera::NAMESPACE);
    let on_real_node: Vec<Pod> = plugin_pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=kubelet-plugin"))
        .await
        .expect("listing the plugin's pods")
        .items
        .into_iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&real.name))
        .collect();
    assert_eq!(
        on_real_node.len(),
        1,
        "the plugin's pods on the real node: {on_real_node:#?}"
    );
    let slices: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &version.resource_api("ResourceSlice", "resourceslices"),
    );
    let published = slices
        .list(&ListParams::default())
        .await
        .expect("listing ResourceSlices")
        .items
        .iter()
        .any(|s| s.data["spec"]["nodeName"].as_str() == Some(&real.name));
    assert!(published, "no ResourceSlice of the real node {}", real.name);

    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "on-the-real-node", "namespace": "default" },
        "spec": {
            "restartPolicy": "Never",
            "nodeName": real.name,
            "containers": [{
                "name": "main",
                "image": BUSYBOX_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["/bin/sh", "-c", "echo hello from $(hostname)"],
            }],
        },
    }))
    .expect("pod object");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("creating a pod");
    let start = Instant::now();
    loop {
        let pod = pods.get("on-the-real-node").await.expect("reading the pod");
        let phase = pod.status.and_then(|s| s.phase).unwrap_or_default();
        if phase == "Succeeded" {
            break;
        }
        assert!(
            phase != "Failed" && start.elapsed() < POD_TIMEOUT,
            "the pod on the real node is {phase:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = pods
        .logs("on-the-real-node", &LogParams::default())
        .await
        .expect("the pod's log");
    assert_eq!(log.trim(), "hello from on-the-real-node");

    drop(guard);
    for c in &record.components {
        assert!(!is_alive(c.pid), "{} (pid {}) outlived down", c.name, c.pid);
    }
    assert!(
        !real.root.exists(),
        "{} is left after down",
        real.root.display()
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains(&*real.root.to_string_lossy()),
        "mounts left under {}",
        real.root.display()
    );
    if let Some(cgroup) = &real.cgroup {
        let leftover: Vec<_> = std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
            .map(|h| h.path().join(cgroup.trim_start_matches('/')))
            .filter(|p| p.exists())
            .collect();
        assert!(leftover.is_empty(), "cgroups left: {leftover:?}");
    }
    eprintln!("{test}: passed");
}

/// Runs `tessera-cluster down` when dropped (also when the test panics).
struct DownOnDrop(std::path::PathBuf);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        let down = cluster(&["down"], &self.0);
        if !down.status.success() {
            eprintln!(
                "tessera-cluster down failed:\n{}",
                String::from_utf8_lossy(&down.stderr)
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_node_cluster_up_v1_37() {
    up_and_down(K8sVersion::newest()).await;
}
