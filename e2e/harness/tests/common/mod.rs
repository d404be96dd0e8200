//! Shared pieces of the e2e tests: the gate that decides whether a test runs,
//! logging, state directories, and the cluster objects every DRA scenario needs.

#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tessera_e2e_harness::K8sVersion;
use tessera_e2e_harness::binaries::Binaries;
use tessera_e2e_harness::process::log_tail;

/// Decides whether an e2e test runs: [`Binaries::for_test`].
pub fn binaries_or_skip(version: K8sVersion, test: &str) -> Option<Binaries> {
    Binaries::for_test(version, test)
}

pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(tessera_e2e_harness::DEFAULT_LOG_FILTER)
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A state directory under the system temp dir, removed afterwards unless
/// `TESSERA_E2E_KEEP=1` (then its path is printed, to read the component logs).
pub struct StateDir {
    path: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl StateDir {
    pub fn new(test: &str) -> Self {
        let temp = tempfile::Builder::new()
            .prefix(&format!("tessera-e2e-{test}-"))
            .tempdir()
            .expect("creating a temp state directory");
        if std::env::var("TESSERA_E2E_KEEP").as_deref() == Ok("1") {
            let path = temp.keep();
            eprintln!("{test}: keeping state directory {}", path.display());
            return StateDir { path, _temp: None };
        }
        StateDir {
            path: temp.path().to_owned(),
            _temp: Some(temp),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Registers a node the way a kubelet would: Ready, with cpu, memory and pod
/// capacity. The status goes through the status subresource because that is
/// the only write path the API guarantees to keep it from.
pub async fn create_ready_node(client: &kube::Client, name: &str) -> Node {
    let nodes: Api<Node> = Api::all(client.clone());
    let resources = json!({ "cpu": "8", "memory": "32Gi", "pods": "110" });
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": name, "labels": { "kubernetes.io/hostname": name } },
    }))
    .expect("node object");
    nodes
        .create(&PostParams::default(), &node)
        .await
        .expect("creating node");
    let status = json!({
        "status": {
            "capacity": resources,
            "allocatable": resources,
            "conditions": [{
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "simulated by tessera-e2e-harness",
            }],
        }
    });
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("setting node status")
}

/// A pod whose only container uses the claim `claim` (no kubelet runs it, so
/// the image is never pulled).
pub fn pod_with_claim(name: &str, claim: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": "default" },
        "spec": {
            "containers": [{
                "name": "main",
                "image": "tessera.invalid/never-pulled:0",
                "resources": { "claims": [{ "name": "gpu" }] },
            }],
            "resourceClaims": [{ "name": "gpu", "resourceClaimName": claim }],
        },
    }))
    .expect("pod object")
}

/// Waits until the scheduler has bound the pod; returns the node name. On
/// timeout the panic shows the scheduler's log tail and the pod's conditions,
/// which is where the reason a pod stays pending is.
pub async fn wait_for_binding(
    client: &kube::Client,
    name: &str,
    scheduler_log: &Path,
    timeout: Duration,
) -> String {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
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
                log_tail(scheduler_log, 60)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
