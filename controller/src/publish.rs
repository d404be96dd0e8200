//! Publishing one node's pool: list what is there, decide the generation, delete obsolete slices,
//! update changed ones, create missing ones, and read every written slice back to find fields the
//! API server dropped (a feature gate that is off).
//!
//! Follows the upstream resourceslice controller (dra-api.md §4.2): the pool's generation is
//! bumped whenever anything in the pool changes and every slice is rewritten with it, so a
//! consumer never mixes slices of two generations.

use std::collections::BTreeMap;

use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::Value;
use tessera_api::names::DRIVER_NAME;

use crate::slices::compare::{dropped_fields, same};
use crate::slices::{ApiVersion, PoolPlan, SliceMeta, render_pool};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Its causes are in the message (a client error alone says only `client error
    /// (Connect)`), so it is not also a `source`.
    #[error("API server: {}", tessera_api::error_chain::Chain(.0))]
    Api(kube::Error),
    #[error("slice object: {0}")]
    Encode(#[from] serde_json::Error),
}

impl From<kube::Error> for PublishError {
    fn from(error: kube::Error) -> Self {
        PublishError::Api(error)
    }
}

/// What one sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub generation: i64,
    pub created: usize,
    pub updated: usize,
    pub deleted: usize,
    /// `<slice>: <path>` of every field the server did not keep.
    pub dropped: Vec<String>,
}

impl SyncReport {
    pub fn changed(&self) -> bool {
        self.created + self.updated + self.deleted > 0
    }
}

/// The ResourceSlice resource of one API version.
pub fn slice_resource(version: ApiVersion) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("resource.k8s.io", version.version(), "ResourceSlice"),
        "resourceslices",
    )
}

/// Publishes the pool of one node through one API version.
#[derive(Clone)]
pub struct Publisher {
    client: Client,
    node: String,
    version: ApiVersion,
    api: Api<DynamicObject>,
    /// The highest generation this publisher wrote: when all slices were deleted by someone
    /// else, the next generation still goes up, so no consumer can confuse old and new.
    last_generation: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

impl Publisher {
    pub fn new(client: Client, node: &str, version: ApiVersion) -> Self {
        let api = Api::all_with(client.clone(), &slice_resource(version));
        Publisher {
            client,
            node: node.to_string(),
            version,
            api,
            last_generation: Default::default(),
        }
    }

    pub fn version(&self) -> ApiVersion {
        self.version
    }

    /// The field selector of this node's Tessera slices.
    pub fn field_selector(&self) -> String {
        format!("spec.nodeName={},spec.driver={DRIVER_NAME}", self.node)
    }

    /// The node's slices as JSON, by name.
    pub async fn existing(&self) -> Result<BTreeMap<String, Value>, PublishError> {
        let list = self
            .api
            .list(&ListParams::default().fields(&self.field_selector()))
            .await?;
        let mut out = BTreeMap::new();
        for item in list.items {
            let value = serde_json::to_value(&item)?;
            if let Some(name) = item.metadata.name {
                out.insert(name, value);
            }
        }
        Ok(out)
    }

    /// The Node's UID for owner references; `None` if the Node does not exist (yet).
    async fn node_uid(&self) -> Result<Option<String>, PublishError> {
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(self.client.clone());
        Ok(nodes
            .get_opt(&self.node)
            .await?
            .and_then(|n| n.metadata.uid))
    }

    /// Makes the cluster hold exactly `plan`.
    pub async fn sync(&self, plan: &PoolPlan) -> Result<SyncReport, PublishError> {
        let existing = self.existing().await?;
        let current = existing
            .values()
            .filter_map(|o| o["spec"]["pool"]["generation"].as_i64())
            .max()
            .unwrap_or(0);
        let uid = self.node_uid().await?;
        let meta = SliceMeta {
            generation: current,
            node_uid: uid.as_deref(),
        };
        let desired = render_pool(plan, self.version, &meta);
        let unchanged = desired.len() == existing.len()
            && desired.iter().all(|d| {
                let name = d["metadata"]["name"].as_str().unwrap_or_default();
                existing
                    .get(name)
                    .is_some_and(|e| same(&d["spec"], &e["spec"]) && owners_match(d, e))
            });
        if unchanged && current > 0 {
            return Ok(SyncReport {
                generation: current,
                ..SyncReport::default()
            });
        }
        let generation = current.max(
            self.last_generation
                .load(std::sync::atomic::Ordering::Relaxed),
        ) + 1;
        self.last_generation
            .fetch_max(generation, std::sync::atomic::Ordering::Relaxed);
        let desired = render_pool(
            plan,
            self.version,
            &SliceMeta {
                generation,
                node_uid: uid.as_deref(),
            },
        );
        let mut report = SyncReport {
            generation,
            ..SyncReport::default()
        };
        let wanted: Vec<&str> = desired
            .iter()
            .filter_map(|d| d["metadata"]["name"].as_str())
            .collect();
        // Obsolete slices go first, so the pool never shows more slices than its count says.
        for name in existing.keys().filter(|n| !wanted.contains(&n.as_str())) {
            match self.api.delete(name, &DeleteParams::default()).await {
                Ok(_) => report.deleted += 1,
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        for object in desired {
            let name = object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let written = match existing.get(&name) {
                Some(old) => {
                    let mut object = object.clone();
                    object["metadata"]["resourceVersion"] =
                        old["metadata"]["resourceVersion"].clone();
                    let obj: DynamicObject = serde_json::from_value(object)?;
                    report.updated += 1;
                    self.api
                        .replace(&name, &PostParams::default(), &obj)
                        .await?
                }
                None => {
                    let obj: DynamicObject = serde_json::from_value(object.clone())?;
                    report.created += 1;
                    self.api.create(&PostParams::default(), &obj).await?
                }
            };
            let got = serde_json::to_value(&written)?;
            report.dropped.extend(
                dropped_fields(&object["spec"], &got["spec"])
                    .into_iter()
                    .map(|p| format!("{name}: spec.{p}")),
            );
        }
        Ok(report)
    }

    /// Deletes all of this node's slices (no GPU left to offer, tests); returns how many it
    /// deleted. A slice already gone is not an error.
    pub async fn delete_all(&self) -> Result<usize, PublishError> {
        let existing = self.existing().await?;
        let mut deleted = 0;
        for name in existing.keys() {
            match self.api.delete(name, &DeleteParams::default()).await {
                Ok(_) => deleted += 1,
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(deleted)
    }
}

fn owners_match(desired: &Value, existing: &Value) -> bool {
    let uid = |v: &Value| {
        v["metadata"]["ownerReferences"][0]["uid"]
            .as_str()
            .map(str::to_string)
    };
    uid(desired) == uid(existing)
}
