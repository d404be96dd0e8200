//! Who may have `priority: high`: a claim's neighbours on its GPU drop to 1% of the GPU while
//! it runs, so that is the cluster admin's to grant, not a tenant's to take.
//!
//! High priority from a DeviceClass's config is the admin's word and always stands. High
//! priority a claim asks for in its own config stands only in a namespace the admin labelled
//! [`HIGH_PRIORITY_NAMESPACE_LABEL`]`=true`: the same shape as DRA's own admin access, which a
//! namespace label also gates, and a namespace's labels are the admin's to write in every
//! multi-tenant setup. The plugin checks at prepare, on the node, so the rule holds whatever
//! admission policies a cluster runs.

use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use tessera_api::Priority;
use tessera_api::names::HIGH_PRIORITY_NAMESPACE_LABEL;
use tessera_driver::claim_config::{self, ConfigSource};

use crate::claims::Claim;

/// Checks claims against the rule, reading namespaces through the plugin's client.
pub struct PriorityGrants {
    namespaces: Api<Namespace>,
}

impl PriorityGrants {
    pub fn new(client: kube::Client) -> PriorityGrants {
        PriorityGrants {
            namespaces: Api::all(client),
        }
    }

    /// `Err` with the rule and how to grant it when `claim` asks in its own config for a priority
    /// its namespace was not granted. A config that does not parse passes here: preparing the
    /// claim reports it.
    pub async fn check(&self, claim: &Claim) -> Result<(), String> {
        let Some(allocation) = &claim.allocation else {
            return Ok(());
        };
        let Ok(merged) =
            claim_config::merge_with_source(&allocation.config, &allocation.requests_of_ours())
        else {
            return Ok(());
        };
        if merged.config.priority != Priority::High || merged.source != Some(ConfigSource::Claim) {
            return Ok(());
        }
        let namespace = &claim.namespace;
        let labels = self
            .namespaces
            .get_metadata_opt(namespace)
            .await
            .map_err(|e| {
                format!(
                    "claim {namespace}/{} asks for priority high in its own config, and reading namespace {namespace:?} to see whether the cluster admin granted it failed: {}",
                    claim.name,
                    tessera_api::error_chain::Chain(&e)
                )
            })?
            .and_then(|ns| ns.metadata.labels)
            .unwrap_or_default();
        if labels
            .get(HIGH_PRIORITY_NAMESPACE_LABEL)
            .is_some_and(|value| value == "true")
        {
            return Ok(());
        }
        Err(format!(
            "claim {namespace}/{} asks for priority high in its own config, but only the cluster admin may grant high priority: label the namespace (kubectl label namespace {namespace} {HIGH_PRIORITY_NAMESPACE_LABEL}=true) or give the claim a DeviceClass whose config sets it",
            claim.name
        ))
    }
}
