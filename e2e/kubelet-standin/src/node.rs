//! The Node object and its heartbeats, as a kubelet keeps them.

use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::Args;

const LEASE_NAMESPACE: &str = "kube-node-lease";
const LEASE_SECONDS: i32 = 40;
const RENEW_EVERY: Duration = Duration::from_secs(10);
/// The Ready condition's heartbeat; the node-lifecycle controller reads the Lease first.
const STATUS_EVERY: Duration = Duration::from_secs(60);

fn ready_status(kubelet_version: &str) -> serde_json::Value {
    let now = Timestamp::now().to_string();
    json!({
        "status": {
            "capacity": { "cpu": "16", "memory": "64Gi", "pods": "110" },
            "allocatable": { "cpu": "16", "memory": "64Gi", "pods": "110" },
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "tessera-kubelet-standin is posting ready status",
                "lastHeartbeatTime": now, "lastTransitionTime": now,
            }],
            "addresses": [{ "type": "InternalIP", "address": "127.0.0.1" }],
            "nodeInfo": {
                "machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "",
                "osImage": "tessera simulated GPU node", "containerRuntimeVersion": "podman://",
                "kubeletVersion": kubelet_version, "kubeProxyVersion": "",
                "operatingSystem": "linux", "architecture": "amd64",
            },
        }
    })
}

/// Creates the Node (or takes over an existing one) and marks it Ready.
pub async fn register(client: &kube::Client, args: &Args) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut labels = serde_json::Map::new();
    labels.insert("kubernetes.io/hostname".into(), json!(args.node_name));
    labels.insert("kubernetes.io/os".into(), json!("linux"));
    labels.insert("kubernetes.io/arch".into(), json!("amd64"));
    for (key, value) in &args.node_labels {
        labels.insert(key.clone(), json!(value));
    }
    let node: Node = serde_json::from_value(json!({
        "metadata": { "name": args.node_name, "labels": labels },
    }))
    .context("building the Node object")?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => tracing::info!(node = %args.node_name, "registered the node"),
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let patch = json!({ "metadata": { "labels": labels } });
            nodes
                .patch(
                    &args.node_name,
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
                .with_context(|| format!("updating the labels of node {}", args.node_name))?;
            tracing::info!(node = %args.node_name, "node already registered; took it over");
        }
        Err(e) => return Err(e).with_context(|| format!("creating node {}", args.node_name)),
    }
    nodes
        .patch_status(
            &args.node_name,
            &PatchParams::default(),
            &Patch::Strategic(ready_status(&args.kubelet_version)),
        )
        .await
        .with_context(|| format!("marking node {} Ready", args.node_name))?;
    Ok(())
}

/// Renews the node's Lease every 10 s and its Ready condition every minute; API errors are
/// logged and retried on the next tick, so a restarting apiserver does not stop the node.
pub async fn heartbeat(client: kube::Client, node: String) -> anyhow::Result<()> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let nodes: Api<Node> = Api::all(client);
    let mut last_status = tokio::time::Instant::now();
    loop {
        let now = MicroTime(Timestamp::now());
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": { "name": node, "namespace": LEASE_NAMESPACE },
            "spec": { "holderIdentity": node, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": now },
        });
        let params = PatchParams::apply("tessera-kubelet-standin").force();
        if let Err(e) = leases.patch(&node, &params, &Patch::Apply(&lease)).await {
            tracing::warn!(%node, "renewing the node lease: {e}");
        }
        if last_status.elapsed() >= STATUS_EVERY {
            let heartbeat = json!({ "status": { "conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "tessera-kubelet-standin is posting ready status",
                "lastHeartbeatTime": Timestamp::now().to_string(),
            }]}});
            match nodes
                .patch_status(&node, &PatchParams::default(), &Patch::Strategic(heartbeat))
                .await
            {
                Ok(_) => last_status = tokio::time::Instant::now(),
                Err(e) => tracing::warn!(%node, "posting node status: {e}"),
            }
        }
        tokio::time::sleep(RENEW_EVERY).await;
    }
}
