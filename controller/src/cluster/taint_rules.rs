//! DeviceTaintRules that name Tessera's devices, checked against what the nodes publish.
//!
//! The API server accepts a rule whose selector matches nothing (a misspelt device, a pool that
//! is a node name mistyped), and the scheduler then simply taints nothing: an admin who meant to
//! drain a GPU for maintenance would find pods still landing on it. The controller warns with an
//! Event on the rule (`DeviceTaintRuleMatchesNothing`), naming what the pool does have. Once per
//! rule and generation; rules of other drivers are not looked at.

use std::collections::BTreeSet;

use kube::Client;
use kube::api::{Api, DynamicObject};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use serde_json::Value;
use tessera_api::names::DRIVER_NAME;

use super::ClusterView;

/// The Event reason of a rule that matches no Tessera device.
pub const REASON: &str = "DeviceTaintRuleMatchesNothing";
/// `resource.k8s.io` versions that serve DeviceTaintRule, newest first (v1 from 1.37, v1beta2
/// in 1.36, v1alpha3 in 1.33–1.35).
const VERSIONS: [&str; 3] = ["v1", "v1beta2", "v1alpha3"];

/// A rule of `gpu.tessera.dev` whose selector matches none of the published devices, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unmatched {
    pub name: String,
    pub generation: i64,
    pub uid: String,
    pub api_version: String,
    pub reason: String,
}

/// The rules among `rules` that select Tessera's devices and match none of `view`'s.
pub fn unmatched(rules: &[Value], view: &ClusterView) -> Vec<Unmatched> {
    let list = |names: &BTreeSet<String>| {
        let shown: Vec<&str> = names.iter().take(8).map(String::as_str).collect();
        let more = names.len().saturating_sub(shown.len());
        if more > 0 {
            format!("{}, and {more} more", shown.join(", "))
        } else {
            shown.join(", ")
        }
    };
    let pools: BTreeSet<String> = view.devices.keys().cloned().collect();
    let mut out = Vec::new();
    for rule in rules {
        let selector = &rule["spec"]["deviceSelector"];
        if selector["driver"].as_str() != Some(DRIVER_NAME) {
            continue;
        }
        let pool = selector["pool"].as_str();
        let device = selector["device"].as_str();
        let reason = match (pool, device) {
            (Some(pool), _) if !view.devices.contains_key(pool) => Some(format!(
                "pool {pool:?} publishes no {DRIVER_NAME} devices (a pool is its node's name; pools: {})",
                list(&pools)
            )),
            (Some(pool), Some(device)) if !view.devices[pool].contains(device) => Some(format!(
                "pool {pool:?} has no device {device:?}; it has {}",
                list(&view.devices[pool])
            )),
            (None, Some(device)) if view.devices.values().all(|d| !d.contains(device)) => {
                Some(format!(
                    "no {DRIVER_NAME} pool has a device {device:?} (pools: {})",
                    list(&pools)
                ))
            }
            _ => None,
        };
        if let Some(reason) = reason {
            out.push(Unmatched {
                name: rule["metadata"]["name"].as_str().unwrap_or_default().into(),
                generation: rule["metadata"]["generation"].as_i64().unwrap_or_default(),
                uid: rule["metadata"]["uid"].as_str().unwrap_or_default().into(),
                api_version: rule["apiVersion"].as_str().unwrap_or_default().into(),
                reason,
            });
        }
    }
    out
}

/// Warns about rules that match nothing, once per rule and generation.
pub struct TaintRuleCheck {
    client: Client,
    recorder: Recorder,
    warned: BTreeSet<(String, i64)>,
    said_not_served: bool,
}

impl TaintRuleCheck {
    pub fn new(client: Client) -> TaintRuleCheck {
        let reporter = Reporter {
            controller: "tessera-controller".into(),
            instance: None,
        };
        TaintRuleCheck {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            warned: BTreeSet::new(),
            said_not_served: false,
        }
    }

    /// Lists the rules in the newest version served and warns about new unmatched ones;
    /// returns them.
    pub async fn check(&mut self, view: &ClusterView) -> Result<Vec<Unmatched>, kube::Error> {
        let Some(rules) = self.list().await? else {
            if !self.said_not_served {
                self.said_not_served = true;
                tracing::debug!("DeviceTaintRules are not served; not checking them");
            }
            return Ok(Vec::new());
        };
        let found = unmatched(&rules, view);
        for rule in &found {
            if !self.warned.insert((rule.uid.clone(), rule.generation)) {
                continue;
            }
            tracing::warn!(rule = %rule.name, reason = %rule.reason, "a DeviceTaintRule for {DRIVER_NAME} matches no device");
            let reference = k8s_openapi::api::core::v1::ObjectReference {
                api_version: Some(rule.api_version.clone()),
                kind: Some("DeviceTaintRule".into()),
                name: Some(rule.name.clone()),
                uid: Some(rule.uid.clone()),
                ..Default::default()
            };
            let event = Event {
                type_: EventType::Warning,
                reason: REASON.into(),
                note: Some(format!("matches no device: {}", rule.reason)),
                action: "CheckDeviceTaintRule".into(),
                secondary: None,
            };
            if let Err(e) = self.recorder.publish(&event, &reference).await {
                tracing::warn!(error = %tessera_api::error_chain::Chain(&e), rule = %rule.name, "cannot record Event");
            }
        }
        Ok(found)
    }

    /// The rules, or `None` where no version serves them.
    async fn list(&self) -> Result<Option<Vec<Value>>, kube::Error> {
        for version in VERSIONS {
            let resource = ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk("resource.k8s.io", version, "DeviceTaintRule"),
                "devicetaintrules",
            );
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &resource);
            match api.list(&Default::default()).await {
                Ok(list) => {
                    let rules = list
                        .items
                        .into_iter()
                        .filter_map(|r| serde_json::to_value(r).ok())
                        .map(|mut r| {
                            r["apiVersion"] = Value::from(format!("resource.k8s.io/{version}"));
                            r
                        })
                        .collect();
                    return Ok(Some(rules));
                }
                Err(kube::Error::Api(s)) if s.code == 404 => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn view() -> ClusterView {
        let mut view = ClusterView::default();
        view.devices.insert(
            "gpu-node-0".into(),
            ["gpu-0".to_string(), "gpu-1".to_string()].into(),
        );
        view
    }

    fn rule(name: &str, selector: Value) -> Value {
        json!({ "apiVersion": "resource.k8s.io/v1", "metadata": { "name": name, "uid": name, "generation": 1 },
                "spec": { "deviceSelector": selector, "taint": { "key": "k", "effect": "NoSchedule" } } })
    }

    #[test]
    fn rules_naming_what_is_not_published_are_found() {
        let rules = [
            rule(
                "ok",
                json!({ "driver": DRIVER_NAME, "pool": "gpu-node-0", "device": "gpu-1" }),
            ),
            rule(
                "whole-pool",
                json!({ "driver": DRIVER_NAME, "pool": "gpu-node-0" }),
            ),
            rule(
                "any-gpu-0",
                json!({ "driver": DRIVER_NAME, "device": "gpu-0" }),
            ),
            rule(
                "other-driver",
                json!({ "driver": "nic.example.com", "pool": "x" }),
            ),
            rule(
                "typo-device",
                json!({ "driver": DRIVER_NAME, "pool": "gpu-node-0", "device": "gpu-9" }),
            ),
            rule(
                "typo-pool",
                json!({ "driver": DRIVER_NAME, "pool": "gpu-node-O" }),
            ),
            rule(
                "nowhere",
                json!({ "driver": DRIVER_NAME, "device": "gpu-7" }),
            ),
        ];
        let found = unmatched(&rules, &view());
        let names: Vec<&str> = found.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["typo-device", "typo-pool", "nowhere"]);
        assert_eq!(
            found[0].reason,
            r#"pool "gpu-node-0" has no device "gpu-9"; it has gpu-0, gpu-1"#
        );
        assert!(
            found[1].reason.contains("pools: gpu-node-0"),
            "{}",
            found[1].reason
        );
    }
}
