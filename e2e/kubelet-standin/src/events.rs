//! Events on pods, as the kubelet records them (`kubectl describe pod` shows them).

use k8s_openapi::api::core::v1::{Event, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use serde_json::json;

pub enum Kind {
    Normal,
    Warning,
}

/// Best effort: an event that cannot be written is logged, never fatal.
pub async fn record(
    client: &kube::Client,
    node: &str,
    pod: &Pod,
    kind: Kind,
    reason: &str,
    message: &str,
) {
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    let now = Timestamp::now().to_string();
    let event = json!({
        "metadata": { "generateName": format!("{pod_name}."), "namespace": namespace },
        "involvedObject": {
            "apiVersion": "v1", "kind": "Pod", "name": pod_name, "namespace": namespace,
            "uid": pod.metadata.uid,
        },
        "reason": reason,
        "message": message,
        "type": match kind { Kind::Normal => "Normal", Kind::Warning => "Warning" },
        "source": { "component": "kubelet", "host": node },
        "reportingComponent": "kubelet",
        "reportingInstance": node,
        "firstTimestamp": now, "lastTimestamp": now, "count": 1,
    });
    let event: Event = match serde_json::from_value(event) {
        Ok(event) => event,
        Err(e) => {
            tracing::warn!("building event {reason}: {e}");
            return;
        }
    };
    let events: Api<Event> = Api::namespaced(client.clone(), &namespace);
    if let Err(e) = events.create(&PostParams::default(), &event).await {
        tracing::warn!(pod = %pod_name, "recording event {reason}: {e}");
    }
}
