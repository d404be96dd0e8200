//! Per-version reads, reduced to [`Claim`]: typed k8s-openapi objects for `v1`, `v1beta2` and
//! `v1beta1` (whose allocation results are field-for-field alike), and Tessera's own serde types
//! for 1.31's `v1alpha3`, which k8s-openapi 0.29 no longer has.

use std::collections::BTreeMap;

use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use serde::Deserialize;
use tessera_driver::allocation::DeviceResult;
use tessera_driver::claim_config::{ConfigEntry, ConfigSource};

use super::{Allocation, ApiVersion, Claim, Error, GROUP, Result};

/// Reads one claim; `Ok(None)` when it does not exist.
pub async fn get(
    client: &Client,
    version: ApiVersion,
    namespace: &str,
    name: &str,
) -> Result<Option<Claim>> {
    use k8s_openapi::api::resource::{v1, v1beta1, v1beta2};
    let api_error = |error| Error::Api {
        namespace: namespace.into(),
        name: name.into(),
        version: version.as_str(),
        error,
    };
    // The three typed versions share field names, so one macro body converts them all.
    macro_rules! typed {
        ($module:ident) => {{
            let api: Api<$module::ResourceClaim> = Api::namespaced(client.clone(), namespace);
            let Some(object) = api.get_opt(name).await.map_err(api_error)? else {
                return Ok(None);
            };
            let status = object.status.unwrap_or_default();
            let device_status = status
                .devices
                .unwrap_or_default()
                .into_iter()
                .filter(|d| d.driver == tessera_api::names::DRIVER_NAME)
                .filter_map(|d| serde_json::to_value(d).ok())
                .collect();
            let allocation = status.allocation.map(|allocation| {
                let devices = allocation.devices.unwrap_or_default();
                let results = devices
                    .results
                    .unwrap_or_default()
                    .into_iter()
                    .map(|r| DeviceResult {
                        request: r.request,
                        driver: r.driver,
                        pool: r.pool,
                        device: r.device,
                        share_id: r.share_id,
                        consumed_capacity: r
                            .consumed_capacity
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(k, q)| (k, q.0))
                            .collect(),
                        admin_access: r.admin_access.unwrap_or(false),
                    })
                    .collect();
                let config = devices
                    .config
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|c| {
                        let opaque = c.opaque?;
                        Some(config_entry(
                            &c.source,
                            c.requests.unwrap_or_default(),
                            opaque.driver,
                            opaque.parameters.0,
                        ))
                    })
                    .collect();
                Allocation { results, config }
            });
            Claim {
                namespace: namespace.into(),
                name: name.into(),
                pod_claim_name: pod_claim_name(object.metadata.annotations.as_ref()),
                uid: object.metadata.uid.unwrap_or_default(),
                allocation,
                device_status,
            }
        }};
    }
    let claim = match version {
        ApiVersion::V1 => typed!(v1),
        ApiVersion::V1beta2 => typed!(v1beta2),
        ApiVersion::V1beta1 => typed!(v1beta1),
        ApiVersion::V1alpha3 => {
            let gvk = GroupVersionKind::gvk(GROUP, "v1alpha3", "ResourceClaim");
            let resource = ApiResource::from_gvk_with_plural(&gvk, "resourceclaims");
            let api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), namespace, &resource);
            let Some(object) = api.get_opt(name).await.map_err(api_error)? else {
                return Ok(None);
            };
            let status: Option<alpha::Status> = object
                .data
                .get("status")
                .cloned()
                .map(serde_json::from_value)
                .transpose()
                .map_err(|e| Error::Decode {
                    namespace: namespace.into(),
                    name: name.into(),
                    version: version.as_str(),
                    message: e.to_string(),
                })?;
            Claim {
                namespace: namespace.into(),
                name: name.into(),
                pod_claim_name: pod_claim_name(object.metadata.annotations.as_ref()),
                uid: object.metadata.uid.unwrap_or_default(),
                allocation: status
                    .and_then(|s| s.allocation)
                    .map(alpha::Allocation::into_allocation),
                // 1.31 has no status.devices.
                device_status: Vec::new(),
            }
        }
    };
    Ok(Some(claim))
}

fn pod_claim_name(
    annotations: Option<&std::collections::BTreeMap<String, String>>,
) -> Option<String> {
    annotations?
        .get(super::POD_CLAIM_NAME_ANNOTATION)
        .filter(|name| !name.is_empty())
        .cloned()
}

fn config_entry(
    source: &str,
    requests: Vec<String>,
    driver: String,
    parameters: serde_json::Value,
) -> ConfigEntry {
    // "FromClass" is the only lower-precedence source; anything else counts as the claim's.
    let source = if source == "FromClass" {
        ConfigSource::Class
    } else {
        ConfigSource::Claim
    };
    ConfigEntry {
        source,
        requests,
        driver,
        parameters,
    }
}

/// `resource.k8s.io/v1alpha3` (Kubernetes 1.31), only the status fields the plugin reads.
mod alpha {
    use super::*;

    #[derive(Deserialize)]
    pub struct Status {
        #[serde(default)]
        pub allocation: Option<Allocation>,
    }

    #[derive(Deserialize)]
    pub struct Allocation {
        #[serde(default)]
        pub devices: Option<Devices>,
    }

    #[derive(Deserialize, Default)]
    pub struct Devices {
        #[serde(default)]
        pub results: Vec<Result>,
        #[serde(default)]
        pub config: Vec<Config>,
    }

    #[derive(Deserialize)]
    pub struct Result {
        pub request: String,
        pub driver: String,
        pub pool: String,
        pub device: String,
    }

    #[derive(Deserialize)]
    pub struct Config {
        pub source: String,
        #[serde(default)]
        pub requests: Vec<String>,
        #[serde(default)]
        pub opaque: Option<Opaque>,
    }

    #[derive(Deserialize)]
    pub struct Opaque {
        pub driver: String,
        pub parameters: serde_json::Value,
    }

    impl Allocation {
        pub fn into_allocation(self) -> super::Allocation {
            let devices = self.devices.unwrap_or_default();
            super::Allocation {
                results: devices
                    .results
                    .into_iter()
                    .map(|r| DeviceResult {
                        request: r.request,
                        driver: r.driver,
                        pool: r.pool,
                        device: r.device,
                        share_id: None,
                        consumed_capacity: BTreeMap::new(),
                        // 1.31's admin access was never GA; its results do not carry it.
                        admin_access: false,
                    })
                    .collect(),
                config: devices
                    .config
                    .into_iter()
                    .filter_map(|c| {
                        let opaque = c.opaque?;
                        Some(config_entry(
                            &c.source,
                            c.requests,
                            opaque.driver,
                            opaque.parameters,
                        ))
                    })
                    .collect(),
            }
        }
    }
}
