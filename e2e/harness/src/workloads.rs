//! The objects a user applies to a Tessera cluster, written once for every pinned version:
//! ResourceClaimTemplates asking for a share of a GPU, and pods whose containers run programs
//! from the host (the stand-in pulls no image).
//!
//! A share is memory and cores. On 1.34+ (consumable capacity) a claim asks for exactly that;
//! on older releases the nodes publish tenths of a GPU (`fixed:10`), so a share becomes that
//! many tenths of one GPU (memory and cores both in tenths).

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use serde_json::{Value, json};

use crate::cluster::SimCluster;
use crate::error::{Error, Result};
use crate::versions::K8sVersion;

/// What a claim asks of one GPU.
#[derive(Clone, Debug)]
pub struct Share {
    /// A quantity, e.g. `2Gi` (consumable capacity).
    pub memory: String,
    /// 1–100.
    pub cores: u32,
    /// Tenths of the GPU, where only fixed tenths are published (before 1.34).
    pub tenths: u32,
    /// The `GpuConfig` fields the claim sets (`oversubscribe`, `priority`, ...), if any.
    pub gpu_config: Option<Value>,
}

/// How a claim picks its GPU.
#[derive(Clone, Debug)]
pub struct Selection {
    pub device_class: String,
    /// CEL expressions over the device.
    pub cel: Vec<String>,
}

impl Selection {
    pub fn class(device_class: &str) -> Selection {
        Selection {
            device_class: device_class.to_owned(),
            cel: Vec::new(),
        }
    }

    pub fn cel(mut self, expression: &str) -> Selection {
        self.cel.push(expression.to_owned());
        self
    }
}

/// A ResourceClaimTemplate with one request, `gpu`, for `share` of a GPU chosen by `selection`.
pub fn claim_template(
    version: K8sVersion,
    namespace: &str,
    name: &str,
    selection: &Selection,
    share: &Share,
) -> Value {
    let selectors: Vec<Value> = selection
        .cel
        .iter()
        .map(|e| json!({ "cel": { "expression": e } }))
        .collect();
    let api_version = format!("resource.k8s.io/{}", version.resource_api_version());
    let devices = if version.minor() >= 34 {
        json!({ "requests": [{ "name": "gpu", "exactly": {
            "deviceClassName": selection.device_class,
            "selectors": selectors,
            "capacity": { "requests": { "memory": share.memory, "cores": share.cores.to_string() } },
        }}]})
    } else {
        json!({
            "requests": [{
                "name": "gpu",
                "deviceClassName": selection.device_class,
                "selectors": selectors,
                "allocationMode": "ExactCount",
                "count": share.tenths,
            }],
            // All tenths from one GPU: the shim keeps one limit per GPU.
            "constraints": [{ "requests": ["gpu"], "matchAttribute": "gpu.tessera.dev/uuid" }],
        })
    };
    let mut devices = devices;
    if let Some(fields) = &share.gpu_config {
        let mut parameters =
            json!({ "apiVersion": "gpu.tessera.dev/v1alpha1", "kind": "GpuConfig" });
        if let (Some(p), Some(fields)) = (parameters.as_object_mut(), fields.as_object()) {
            p.extend(fields.clone());
        }
        devices["config"] = json!([{
            "requests": ["gpu"],
            "opaque": { "driver": "gpu.tessera.dev", "parameters": parameters },
        }]);
    }
    json!({
        "apiVersion": api_version, "kind": "ResourceClaimTemplate",
        "metadata": { "name": name, "namespace": namespace },
        "spec": { "spec": { "devices": devices } },
    })
}

/// One container of a pod.
#[derive(Clone, Debug)]
pub struct ContainerSpec {
    pub name: String,
    pub command: Vec<String>,
    /// Names of the pod's claims it uses.
    pub claims: Vec<String>,
}

/// A pod whose containers use the claims generated from `templates` (claim name → template).
pub fn pod(
    namespace: &str,
    name: &str,
    templates: &[(&str, &str)],
    containers: &[ContainerSpec],
    host_dirs: &[(&str, &str)],
    annotations: &[(&str, &str)],
) -> Value {
    let claims: Vec<Value> = templates
        .iter()
        .map(|(claim, template)| json!({ "name": claim, "resourceClaimTemplateName": template }))
        .collect();
    let volumes: Vec<Value> = host_dirs
        .iter()
        .enumerate()
        .map(|(i, (host, _))| json!({ "name": format!("host-{i}"), "hostPath": { "path": host, "type": "Directory" } }))
        .collect();
    let mounts: Vec<Value> = host_dirs
        .iter()
        .enumerate()
        .map(|(i, (_, path))| json!({ "name": format!("host-{i}"), "mountPath": path }))
        .collect();
    let containers: Vec<Value> = containers
        .iter()
        .map(|c| json!({
            "name": c.name,
            // Not pulled: the stand-in runs the command on the host's filesystem.
            "image": "host",
            "command": c.command,
            "resources": { "claims": c.claims.iter().map(|n| json!({ "name": n })).collect::<Vec<_>>() },
            "volumeMounts": mounts,
        }))
        .collect();
    let annotations: serde_json::Map<String, Value> = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": namespace, "annotations": annotations },
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 2,
            "resourceClaims": claims,
            "containers": containers,
            "volumes": volumes,
        },
    })
}

/// Creates any object of a kind this module writes.
pub async fn create(client: &kube::Client, object: &Value) -> Result<()> {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    let namespace = object["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default");
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let plural = format!("{}s", kind.to_lowercase());
    let resource =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), &plural);
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
    let dynamic: DynamicObject =
        serde_json::from_value(object.clone()).map_err(|e| Error::State {
            dir: Default::default(),
            reason: format!("{kind} {name}: {e}"),
        })?;
    api.create(&PostParams::default(), &dynamic)
        .await
        .map_err(Error::kube(format!("creating {kind} {namespace}/{name}")))?;
    Ok(())
}

/// Polls the pod until `done` says so, checking Tessera's processes on every round; the
/// pod's last state is in the timeout error.
pub async fn wait_pod(
    cluster: &mut SimCluster,
    namespace: &str,
    name: &str,
    what: &str,
    timeout: Duration,
    done: impl Fn(&Pod) -> bool,
) -> Result<Pod> {
    let pods: Api<Pod> = Api::namespaced(cluster.client(), namespace);
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        cluster.check_running()?;
        if let Ok(Some(pod)) = pods.get_opt(name).await {
            if done(&pod) {
                return Ok(pod);
            }
            last = Some(pod);
        }
        if Instant::now() >= deadline {
            let state = last
                .map(|p| serde_json::to_string_pretty(&p.status).unwrap_or_default())
                .unwrap_or_else(|| "the pod does not exist".into());
            return Err(Error::Timeout {
                what: format!("pod {namespace}/{name} to be {what}"),
                seconds: timeout.as_secs(),
                log: Default::default(),
                tail: state,
            });
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

pub fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

/// Exit code of the named container, once it has terminated.
pub fn exit_code(pod: &Pod, container: &str) -> Option<i32> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == container)?
        .state
        .as_ref()?
        .terminated
        .as_ref()
        .map(|t| t.exit_code)
}

pub fn node_name(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default()
}

/// Waits until the pod object is gone (the stand-in removes it once its claims are unprepared).
pub async fn wait_gone(
    cluster: &mut SimCluster,
    namespace: &str,
    name: &str,
    timeout: Duration,
) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(cluster.client(), namespace);
    let deadline = Instant::now() + timeout;
    loop {
        cluster.check_running()?;
        if let Ok(None) = pods.get_opt(name).await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!("pod {namespace}/{name} to be removed"),
                seconds: timeout.as_secs(),
                log: Default::default(),
                tail: String::new(),
            });
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
