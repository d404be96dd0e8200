//! A pod's ResourceClaims, read as the kubelet reads them before it prepares: the claim's name
//! (direct, or generated from a template and recorded in the pod's status), its allocation, and
//! whether it is reserved for the pod.

use anyhow::Context;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use serde_json::Value;

use crate::plugin::ClaimRef;

const GROUP: &str = "resource.k8s.io";
const DRIVER: &str = "gpu.tessera.dev";

/// `resource.k8s.io` in the version the API server prefers (v1 on 1.34+, v1alpha3 on 1.31).
#[derive(Clone)]
pub struct ResourceApi {
    resource: ApiResource,
}

impl ResourceApi {
    pub async fn discover(client: &kube::Client) -> anyhow::Result<ResourceApi> {
        let groups = client
            .list_api_groups()
            .await
            .context("listing the API groups")?;
        let group = groups
            .groups
            .iter()
            .find(|g| g.name == GROUP)
            .with_context(|| format!("the API server does not serve {GROUP} (DRA is off)"))?;
        let version = group
            .preferred_version
            .as_ref()
            .or_else(|| group.versions.first())
            .map(|v| v.version.clone())
            .with_context(|| format!("{GROUP} lists no version"))?;
        let gvk = GroupVersionKind::gvk(GROUP, &version, "ResourceClaim");
        Ok(ResourceApi {
            resource: ApiResource::from_gvk_with_plural(&gvk, "resourceclaims"),
        })
    }

    pub fn version(&self) -> &str {
        &self.resource.version
    }

    fn claims(&self, client: &kube::Client, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(client.clone(), namespace, &self.resource)
    }
}

/// One of the pod's claims that has devices of ours.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodClaim {
    /// The entry's name in `pod.spec.resourceClaims` (what containers refer to).
    pub pod_claim_name: String,
    pub claim: ClaimRef,
}

/// Whether the pod's claims are ready to prepare.
#[derive(Debug)]
pub enum Resolution {
    /// Every claim exists, is allocated and reserved for the pod; those with devices of ours.
    Ready(Vec<PodClaim>),
    /// Not yet; the reason, for the pod's status.
    Waiting(String),
}

pub async fn resolve(
    client: &kube::Client,
    api: &ResourceApi,
    pod: &Pod,
) -> anyhow::Result<Resolution> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let pod_uid = pod.metadata.uid.as_deref().unwrap_or_default();
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.resource_claim_statuses.as_ref());
    let mut ready = Vec::new();
    for entry in pod
        .spec
        .as_ref()
        .and_then(|s| s.resource_claims.as_ref())
        .into_iter()
        .flatten()
    {
        let claim_name = match (
            &entry.resource_claim_name,
            &entry.resource_claim_template_name,
        ) {
            (Some(name), _) => name.clone(),
            (None, Some(template)) => {
                let status = statuses.and_then(|all| all.iter().find(|s| s.name == entry.name));
                match status {
                    Some(s) => match &s.resource_claim_name {
                        Some(name) => name.clone(),
                        // The template produced no claim: nothing to prepare for this entry.
                        None => continue,
                    },
                    None => {
                        return Ok(Resolution::Waiting(format!(
                            "waiting for the claim of {:?} (template {template}) to be created",
                            entry.name
                        )));
                    }
                }
            }
            (None, None) => continue,
        };
        let claim = match claims_get(client, api, namespace, &claim_name).await? {
            Some(claim) => claim,
            None => {
                return Ok(Resolution::Waiting(format!(
                    "ResourceClaim {namespace}/{claim_name} does not exist"
                )));
            }
        };
        let status = claim.data.get("status").cloned().unwrap_or(Value::Null);
        let Some(results) = status
            .pointer("/allocation/devices/results")
            .and_then(Value::as_array)
        else {
            return Ok(Resolution::Waiting(format!(
                "ResourceClaim {namespace}/{claim_name} is not allocated"
            )));
        };
        let reserved = status
            .get("reservedFor")
            .and_then(Value::as_array)
            .is_some_and(|r| {
                r.iter()
                    .any(|c| c.get("uid").and_then(Value::as_str) == Some(pod_uid))
            });
        if !reserved {
            return Ok(Resolution::Waiting(format!(
                "ResourceClaim {namespace}/{claim_name} is not reserved for this pod"
            )));
        }
        let drivers: Vec<&str> = results
            .iter()
            .filter_map(|r| r.get("driver").and_then(Value::as_str))
            .collect();
        if let Some(other) = drivers.iter().find(|d| **d != DRIVER) {
            return Ok(Resolution::Waiting(format!(
                "ResourceClaim {namespace}/{claim_name} has devices of driver {other}, which has no plugin on this node"
            )));
        }
        if drivers.is_empty() {
            continue;
        }
        ready.push(PodClaim {
            pod_claim_name: entry.name.clone(),
            claim: ClaimRef {
                namespace: namespace.to_owned(),
                name: claim_name,
                uid: claim.metadata.uid.clone().unwrap_or_default(),
            },
        });
    }
    Ok(Resolution::Ready(ready))
}

async fn claims_get(
    client: &kube::Client,
    api: &ResourceApi,
    namespace: &str,
    name: &str,
) -> anyhow::Result<Option<DynamicObject>> {
    api.claims(client, namespace)
        .get_opt(name)
        .await
        .with_context(|| format!("reading ResourceClaim {namespace}/{name}"))
}
