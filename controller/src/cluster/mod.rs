//! The cluster controller (`tessera-controller`): DeviceClasses per GPU model and the cluster's
//! allocation metrics, from all ResourceSlices and ResourceClaims.

pub mod classes;
pub mod http;
pub mod metrics;
pub mod taint_rules;
pub mod view;

use kube::Client;
use kube::api::{Api, DynamicObject, ListParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::Value;

use crate::publish::slice_resource;
use crate::slices::ApiVersion;

pub use classes::{ClassReport, desired_classes, model_class_name, reconcile_classes};
pub use view::{ClusterView, build_view};

fn claim_resource(version: ApiVersion) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("resource.k8s.io", version.version(), "ResourceClaim"),
        "resourceclaims",
    )
}

async fn list_all(client: &Client, resource: &ApiResource) -> Result<Vec<Value>, kube::Error> {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), resource);
    let mut out = Vec::new();
    let mut params = ListParams::default().limit(500);
    loop {
        let page = api.list(&params).await?;
        for item in page.items {
            out.push(serde_json::to_value(item).map_err(kube::Error::SerdeError)?);
        }
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => return Ok(out),
        }
    }
}

/// Reads all slices and claims and computes the view.
pub async fn observe(client: &Client, version: ApiVersion) -> Result<ClusterView, kube::Error> {
    let slices = list_all(client, &slice_resource(version)).await?;
    let claims = list_all(client, &claim_resource(version)).await?;
    Ok(build_view(&slices, &claims))
}

/// One full reconcile: observe, then (when leading) make the DeviceClasses match the models.
pub async fn reconcile(
    client: &Client,
    version: ApiVersion,
    leading: bool,
) -> Result<(ClusterView, Option<ClassReport>), kube::Error> {
    let view = observe(client, version).await?;
    let report = if leading {
        Some(reconcile_classes(client, version, &desired_classes(&view.products, version)).await?)
    } else {
        None
    };
    Ok((view, report))
}
