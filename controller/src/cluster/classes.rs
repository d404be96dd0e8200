//! DeviceClasses: the generic `gpu.tessera.dev` and one per GPU model present in the cluster's
//! slices (`nvidia-geforce-rtx-4090.gpu.tessera.dev`), so a claim can pick a model with no CEL.

use std::collections::{BTreeMap, BTreeSet};

use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};
use tessera_api::names::{DRIVER_NAME, attribute};

use crate::slices::ApiVersion;
use crate::slices::compare::same;

/// Label on every DeviceClass this controller manages; only those are ever deleted.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "tessera-controller");
/// Annotation with the product name a per-model class selects.
pub const PRODUCT_ANNOTATION: &str = "gpu.tessera.dev/product-name";

/// `NVIDIA GeForce RTX 4090` → `nvidia-geforce-rtx-4090.gpu.tessera.dev`: lowercased,
/// non-alphanumerics → `-` (runs collapsed), a DNS label of at most 63 characters.
pub fn model_class_name(product: &str) -> Option<String> {
    let mut label = String::new();
    for c in product.chars() {
        if c.is_ascii_alphanumeric() {
            label.push(c.to_ascii_lowercase());
        } else if !label.ends_with('-') && !label.is_empty() {
            label.push('-');
        }
    }
    label.truncate(63);
    let label = label.trim_end_matches('-');
    (!label.is_empty()).then(|| format!("{label}.{DRIVER_NAME}"))
}

/// CEL string literal.
fn cel_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The DeviceClass resource of one API version.
pub fn class_resource(version: ApiVersion) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("resource.k8s.io", version.version(), "DeviceClass"),
        "deviceclasses",
    )
}

/// Every class the cluster should have, by name. Two models mapping to one name (differing only
/// in punctuation) share the class, which then selects both.
pub fn desired_classes(
    products: &BTreeSet<String>,
    version: ApiVersion,
) -> BTreeMap<String, Value> {
    let driver = format!("device.driver == {}", cel_string(DRIVER_NAME));
    let mut by_name: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for p in products {
        if let Some(name) = model_class_name(p) {
            by_name.entry(name).or_default().push(p);
        }
    }
    let class = |name: &str, expression: String, product: Option<String>| {
        let mut metadata = json!({ "name": name, "labels": { MANAGED_BY.0: MANAGED_BY.1 } });
        if let Some(p) = product {
            metadata["annotations"] = json!({ PRODUCT_ANNOTATION: p });
        }
        json!({ "apiVersion": version.api_version(), "kind": "DeviceClass", "metadata": metadata,
                "spec": { "selectors": [{ "cel": { "expression": expression } }] } })
    };
    let mut out = BTreeMap::new();
    out.insert(
        DRIVER_NAME.to_string(),
        class(DRIVER_NAME, driver.clone(), None),
    );
    for (name, products) in by_name {
        let any = products
            .iter()
            .map(|p| {
                format!(
                    "device.attributes[{}].{} == {}",
                    cel_string(DRIVER_NAME),
                    attribute::PRODUCT_NAME,
                    cel_string(p)
                )
            })
            .collect::<Vec<_>>()
            .join(" || ");
        let expression = format!("{driver} && ({any})");
        out.insert(
            name.clone(),
            class(&name, expression, Some(products.join(", "))),
        );
    }
    out
}

/// What one reconcile of the classes did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClassReport {
    pub created: Vec<String>,
    pub updated: Vec<String>,
    pub deleted: Vec<String>,
}

/// Makes the cluster's managed DeviceClasses exactly `desired`.
pub async fn reconcile_classes(
    client: &Client,
    version: ApiVersion,
    desired: &BTreeMap<String, Value>,
) -> Result<ClassReport, kube::Error> {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &class_resource(version));
    let mut report = ClassReport::default();
    let existing = api
        .list(&ListParams::default().labels(&format!("{}={}", MANAGED_BY.0, MANAGED_BY.1)))
        .await?;
    let mut seen = BTreeSet::new();
    for obj in existing.items {
        let Some(name) = obj.metadata.name.clone() else {
            continue;
        };
        match desired.get(&name) {
            None => {
                api.delete(&name, &DeleteParams::default()).await?;
                report.deleted.push(name);
            }
            Some(want) => {
                seen.insert(name.clone());
                let have = serde_json::to_value(&obj).unwrap_or_default();
                if !same(&want["spec"], &have["spec"]) {
                    let mut want = want.clone();
                    want["metadata"]["resourceVersion"] =
                        have["metadata"]["resourceVersion"].clone();
                    let obj: DynamicObject =
                        serde_json::from_value(want).map_err(kube::Error::SerdeError)?;
                    api.replace(&name, &PostParams::default(), &obj).await?;
                    report.updated.push(name);
                }
            }
        }
    }
    for (name, want) in desired.iter().filter(|(n, _)| !seen.contains(*n)) {
        let obj: DynamicObject =
            serde_json::from_value(want.clone()).map_err(kube::Error::SerdeError)?;
        match api.create(&PostParams::default(), &obj).await {
            Ok(_) => report.created.push(name.clone()),
            // A class of that name made by someone else (an admin's own): leave it alone.
            // Said once per class: the chart owns the generic class, and a reconcile runs every
            // few seconds.
            Err(kube::Error::Api(s)) if s.code == 409 => {
                let first = NOT_OURS
                    .lock()
                    .map(|mut seen| seen.insert(name.clone()))
                    .unwrap_or(true);
                if first {
                    tracing::info!(class = %name, "DeviceClass exists and is not managed by tessera-controller (an admin's or the Helm chart's); leaving it")
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(report)
}

/// Classes of our names that someone else made, already reported.
static NOT_OURS: std::sync::Mutex<std::collections::BTreeSet<String>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_names_from_products() {
        assert_eq!(
            model_class_name("NVIDIA GeForce RTX 4090").as_deref(),
            Some("nvidia-geforce-rtx-4090.gpu.tessera.dev")
        );
        assert_eq!(
            model_class_name("NVIDIA H100 80GB HBM3").as_deref(),
            Some("nvidia-h100-80gb-hbm3.gpu.tessera.dev")
        );
        assert_eq!(
            model_class_name("  A100-SXM4-40GB (rev 2) ").as_deref(),
            Some("a100-sxm4-40gb-rev-2.gpu.tessera.dev")
        );
        assert_eq!(model_class_name("---"), None);
        let long = model_class_name(&"x".repeat(100)).expect("name");
        assert!(long.split('.').next().is_some_and(|l| l.len() == 63));
    }

    #[test]
    fn desired_has_generic_and_one_per_model() {
        let products = BTreeSet::from([
            "NVIDIA L40S".to_string(),
            "NVIDIA GeForce RTX 4090".to_string(),
        ]);
        let classes = desired_classes(&products, ApiVersion::V1);
        assert_eq!(classes.len(), 3);
        let l40s = &classes["nvidia-l40s.gpu.tessera.dev"];
        assert_eq!(
            l40s["spec"]["selectors"][0]["cel"]["expression"],
            r#"device.driver == "gpu.tessera.dev" && (device.attributes["gpu.tessera.dev"].productName == "NVIDIA L40S")"#
        );
        assert_eq!(
            classes["gpu.tessera.dev"]["spec"]["selectors"][0]["cel"]["expression"],
            r#"device.driver == "gpu.tessera.dev""#
        );
    }
}
