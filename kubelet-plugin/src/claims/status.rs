//! `status.devices` of the claims this node prepared (KEP-4817): which GPU each device is, what
//! the plugin enforces on it, and a `Ready` condition, so `kubectl describe resourceclaim` tells
//! a user what they got. Removed again when the claim is unprepared.
//!
//! Written by server-side apply under one field manager ([`FIELD_MANAGER`]): the API server
//! merges `status.devices` by driver, pool, device and share ID, so other drivers' entries are
//! never touched, and applying an empty list removes exactly the entries this plugin wrote.
//!
//! Best effort, off the kubelet's path: preparation never waits for a status write and never
//! fails because of one. One task writes in the order the calls came (a prepare's write cannot
//! land after the unprepare that followed it), retrying what the API server may answer
//! differently in a moment; every outcome is counted in `tessera_claim_status_writes_total`.
//!
//! What each release serves: 1.31's `v1alpha3` has no `status.devices` (nothing is written;
//! said once); 1.32 and 1.33 keep it behind the `DRAResourceClaimDeviceStatus` feature gate (a
//! server with the gate off drops the field, which is noticed and said once); 1.34+ serve it, and
//! from 1.36 writing it needs `associated-node:patch` on `resourceclaims/driver` for
//! `gpu.tessera.dev` besides `patch` on `resourceclaims/status` (the chart grants both).

use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use serde_json::{Value, json};
use tessera_api::names::DRIVER_NAME;
use tessera_driver::checkpoint::PreparedDevice;
use tessera_driver::inventory::Inventory;
use tessera_driver::quantity;
use tokio::sync::mpsc;

use super::{ApiVersion, ClaimReader, ClaimRef, GROUP};
use crate::metrics::{Metrics, StatusWrite};

/// The field manager of the plugin's `status.devices` entries.
pub const FIELD_MANAGER: &str = "tessera-kubelet-plugin";
/// The condition type saying a device is prepared and its limits are in force.
pub const READY: &str = "Ready";
/// Attempts at one write when the API server's answer may change (unreachable, 5xx, 429).
const ATTEMPTS: u32 = 4;

/// What the plugin says about one prepared device.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceStatus {
    pub pool: String,
    pub device: String,
    pub share_id: Option<String>,
    /// `data`: the GPU and what is enforced on it.
    pub data: Value,
    /// The `Ready` condition's message.
    pub message: String,
}

impl DeviceStatus {
    /// The status of each device of a prepared claim. The memory limit and cores are the
    /// claim's on the device's GPU (the sum of its devices there), which is what the shim
    /// enforces.
    pub fn of_claim(devices: &[PreparedDevice], inventory: &Inventory) -> Vec<DeviceStatus> {
        devices
            .iter()
            .map(|prepared| {
                let device = &prepared.device;
                let on_gpu = devices
                    .iter()
                    .filter(|d| d.device.gpu_uuid == device.gpu_uuid);
                let memory_limit: u64 = on_gpu.clone().map(|d| d.device.memory).sum();
                let cores = on_gpu.map(|d| d.device.cores).sum::<u32>().min(100);
                let gpu = inventory.gpus.iter().find(|g| g.uuid == device.gpu_uuid);
                let product = gpu.map(|g| g.product_name.as_str()).unwrap_or("unknown");
                if device.admin_access {
                    let mut data = json!({
                        "gpuUUID": device.gpu_uuid,
                        "gpuIndex": device.gpu_index,
                        "productName": product,
                        "adminAccess": true,
                    });
                    if let Some(gpu) = gpu {
                        data["gpuMemory"] = json!(quantity::format(gpu.memory));
                    }
                    return DeviceStatus {
                        pool: device.pool.clone(),
                        device: device.device.clone(),
                        share_id: device.share_id.clone(),
                        data,
                        message: format!(
                            "{} GPU {} ({}): admin access, no wall and nothing charged",
                            device.device, device.gpu_index, product
                        ),
                    };
                }
                let mut data = json!({
                    "gpuUUID": device.gpu_uuid,
                    "gpuIndex": device.gpu_index,
                    "productName": product,
                    "memory": quantity::format(device.memory),
                    "memoryLimit": quantity::format(memory_limit),
                    "cores": cores,
                });
                if let Some(gpu) = gpu {
                    data["gpuMemory"] = json!(quantity::format(gpu.memory));
                }
                if let Some(version) = &inventory.driver_version {
                    data["driverVersion"] = json!(version);
                }
                let message = format!(
                    "{} GPU {} ({}): memory wall {}, {}% of its compute",
                    device.device,
                    device.gpu_index,
                    product,
                    quantity::format(memory_limit),
                    cores,
                );
                DeviceStatus {
                    pool: device.pool.clone(),
                    device: device.device.clone(),
                    share_id: device.share_id.clone(),
                    data,
                    message,
                }
            })
            .collect()
    }

    /// The `status.devices` entry, its condition changed at `now` (RFC 3339).
    fn entry(&self, now: &str) -> Value {
        let mut entry = json!({
            "driver": DRIVER_NAME,
            "pool": self.pool,
            "device": self.device,
            "conditions": [{
                "type": READY,
                "status": "True",
                "reason": "Prepared",
                "message": self.message,
                "lastTransitionTime": now,
            }],
            "data": self.data,
        });
        if let Some(share) = &self.share_id {
            entry["shareID"] = json!(share);
        }
        entry
    }

    /// Whether `existing` (a `status.devices` entry) already says this.
    fn said_by(&self, existing: &Value) -> bool {
        let ready = existing["conditions"].as_array().is_some_and(|conditions| {
            conditions.iter().any(|c| {
                c["type"] == READY && c["status"] == "True" && c["message"] == self.message
            })
        });
        existing["pool"] == self.pool.as_str()
            && existing["device"] == self.device.as_str()
            && existing["shareID"].as_str() == self.share_id.as_deref()
            && existing["data"] == self.data
            && ready
    }
}

/// Whether a claim's entries of ours (`existing`, as read) already say `desired`, so a repeated
/// prepare writes nothing and a condition keeps its transition time.
pub fn up_to_date(existing: &[Value], desired: &[DeviceStatus]) -> bool {
    existing.len() == desired.len()
        && desired
            .iter()
            .all(|d| existing.iter().any(|e| d.said_by(e)))
}

#[derive(Debug)]
enum Job {
    Prepared(ClaimRef, Vec<DeviceStatus>),
    Unprepared(ClaimRef),
}

/// How one write ended.
#[derive(Debug)]
pub enum Outcome {
    /// The entries are on the claim.
    Written,
    /// The plugin's entries are gone from the claim.
    Cleared,
    /// The claim no longer exists (or was replaced): nothing to say.
    Gone,
    /// The served `resource.k8s.io` version has no `status.devices`.
    NotServed(ApiVersion),
    /// The API server accepted the write but dropped the field (a 1.32/1.33 server with
    /// `DRAResourceClaimDeviceStatus` off).
    Dropped,
    Failed(String),
}

/// Queues status writes for the writer task.
#[derive(Clone)]
pub struct StatusWriter {
    jobs: mpsc::UnboundedSender<Job>,
}

impl StatusWriter {
    /// Starts the writer task; it ends when every [`StatusWriter`] is dropped.
    pub fn start(
        client: Client,
        reader: Arc<ClaimReader>,
        metrics: Arc<Metrics>,
    ) -> (StatusWriter, tokio::task::JoinHandle<()>) {
        let (jobs, queue) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(client, reader, metrics, queue));
        (StatusWriter { jobs }, task)
    }

    /// Says `devices` are prepared for `claim`.
    pub fn prepared(&self, claim: ClaimRef, devices: Vec<DeviceStatus>) {
        let _ = self.jobs.send(Job::Prepared(claim, devices));
    }

    /// Removes what was said about `claim`.
    pub fn unprepared(&self, claim: ClaimRef) {
        let _ = self.jobs.send(Job::Unprepared(claim));
    }
}

async fn run(
    client: Client,
    reader: Arc<ClaimReader>,
    metrics: Arc<Metrics>,
    mut queue: mpsc::UnboundedReceiver<Job>,
) {
    let mut said_not_served = false;
    let mut said_dropped = false;
    while let Some(job) = queue.recv().await {
        let (claim, devices) = match &job {
            Job::Prepared(claim, devices) => (claim, devices.as_slice()),
            Job::Unprepared(claim) => (claim, &[][..]),
        };
        let outcome = write_with_retries(&client, &reader, claim, devices).await;
        let key = format!("{}/{}", claim.namespace, claim.name);
        match &outcome {
            Outcome::Written | Outcome::Cleared | Outcome::Gone => {
                tracing::debug!(claim = %key, claim_uid = %claim.uid, ?outcome, "claim device status")
            }
            Outcome::NotServed(version) if !said_not_served => {
                said_not_served = true;
                tracing::info!(
                    version = version.as_str(),
                    "not writing claims' device status: {GROUP}/{} has no status.devices (Kubernetes 1.32+)",
                    version.as_str()
                );
            }
            Outcome::Dropped if !said_dropped => {
                said_dropped = true;
                tracing::warn!(
                    claim = %key,
                    "the API server dropped the claim's status.devices: on Kubernetes 1.32 and 1.33 turn on the DRAResourceClaimDeviceStatus feature gate to see what a claim got"
                );
            }
            Outcome::NotServed(_) | Outcome::Dropped => {}
            Outcome::Failed(error) => {
                tracing::warn!(claim = %key, claim_uid = %claim.uid, %error, "writing the claim's device status")
            }
        }
        metrics.observe_status_write(StatusWrite::of(&outcome));
    }
}

async fn write_with_retries(
    client: &Client,
    reader: &ClaimReader,
    claim: &ClaimRef,
    devices: &[DeviceStatus],
) -> Outcome {
    let mut delay = Duration::from_millis(500);
    let mut attempt = 1;
    loop {
        match write(client, reader, claim, devices).await {
            Err(error) if attempt < ATTEMPTS && retryable(&error) => {
                tracing::debug!(claim_uid = %claim.uid, attempt, error = %tessera_api::error_chain::Chain(&error), "claim device status, retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
            Err(error) => return failure(error),
            Ok(outcome) => return outcome,
        }
    }
}

/// Applies `devices` (none: clears) as the claim's entries of this plugin.
pub async fn write(
    client: &Client,
    reader: &ClaimReader,
    claim: &ClaimRef,
    devices: &[DeviceStatus],
) -> Result<Outcome, kube::Error> {
    let version = match reader.version().await {
        Ok(version) => version,
        Err(super::Error::Discovery(error)) => return Err(error),
        Err(error) => return Ok(Outcome::Failed(error.to_string())),
    };
    if version == ApiVersion::V1alpha3 {
        return Ok(Outcome::NotServed(version));
    }
    let resource = kube::api::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk(GROUP, version.as_str(), "ResourceClaim"),
        "resourceclaims",
    );
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &claim.namespace, &resource);
    // The API's own time format (seconds, UTC), as k8s-openapi writes it.
    let now = serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ))
    .unwrap_or_default();
    let now = now.as_str().unwrap_or_default();
    let entries: Vec<Value> = devices.iter().map(|d| d.entry(now)).collect();
    // The UID makes the write a precondition: a claim replaced under the same name is not
    // written to.
    let patch = json!({
        "apiVersion": format!("{GROUP}/{}", version.as_str()),
        "kind": "ResourceClaim",
        "metadata": { "name": claim.name, "namespace": claim.namespace, "uid": claim.uid },
        "status": { "devices": entries },
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let answer = match api
        .patch_status(&claim.name, &params, &Patch::Apply(&patch))
        .await
    {
        Ok(answer) => answer,
        Err(kube::Error::Api(status)) if status.code == 404 || replaced(&status) => {
            return Ok(Outcome::Gone);
        }
        Err(error) => return Err(error),
    };
    if devices.is_empty() {
        return Ok(Outcome::Cleared);
    }
    let kept = answer.data["status"]["devices"]
        .as_array()
        .is_some_and(|d| d.iter().any(|e| e["driver"] == DRIVER_NAME));
    Ok(if kept {
        Outcome::Written
    } else {
        Outcome::Dropped
    })
}

/// Whether the API server refused the write because the claim under that name has another UID
/// (it answers that the UID is immutable).
fn replaced(status: &kube::core::Status) -> bool {
    status.code == 422
        && status
            .details
            .as_ref()
            .is_some_and(|d| d.causes.iter().any(|c| c.field == "metadata.uid"))
}

/// Whether the same write may succeed in a moment.
fn retryable(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => status.code == 429 || status.code >= 500,
        _ => true,
    }
}

fn failure(error: kube::Error) -> Outcome {
    // 1.36+ refuse a missing resourceclaims/driver grant as an invalid field, not a 403.
    let forbidden = matches!(&error, kube::Error::Api(s) if s.code == 403
        || s.details.as_ref().is_some_and(|d| d.causes.iter().any(|c| c.reason == "FieldValueForbidden")));
    let mut message = tessera_api::error_chain::Chain(&error).to_string();
    if forbidden {
        message.push_str(&format!(
            " (the plugin's service account needs patch on resourceclaims/status and, from Kubernetes 1.36, associated-node:patch on resourceclaims/driver named {DRIVER_NAME}; the chart grants both)"
        ));
    }
    Outcome::Failed(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_driver::allocation::AllocatedDevice;

    fn inventory() -> Inventory {
        serde_json::from_value(json!({
            "driverVersion": "570.86.15",
            "gpus": [{ "uuid": "GPU-a", "index": 0, "minor": 0,
                       "productName": "NVIDIA GeForce RTX 4090", "memory": 24u64 << 30 }]
        }))
        .expect("inventory")
    }

    fn device(name: &str, share: Option<&str>, memory: u64, cores: u32) -> PreparedDevice {
        PreparedDevice {
            device: AllocatedDevice {
                request: "gpu".into(),
                pool: "node-a".into(),
                device: name.into(),
                share_id: share.map(Into::into),
                gpu_uuid: "GPU-a".into(),
                gpu_index: 0,
                gpu_minor: 0,
                memory,
                cores,
                admin_access: false,
            },
            cdi_device_ids: Vec::new(),
        }
    }

    #[test]
    fn says_the_gpu_and_the_claims_wall_on_it() {
        let devices = [
            device("gpu-0", Some("s1"), 4 << 30, 30),
            device("gpu-0", Some("s2"), 6 << 30, 80),
        ];
        let status = DeviceStatus::of_claim(&devices, &inventory());
        assert_eq!(status.len(), 2);
        assert_eq!(
            status[0].data,
            json!({
                "gpuUUID": "GPU-a", "gpuIndex": 0, "productName": "NVIDIA GeForce RTX 4090",
                "memory": "4Gi", "memoryLimit": "10Gi", "cores": 100, "gpuMemory": "24Gi",
                "driverVersion": "570.86.15",
            })
        );
        assert_eq!(
            status[0].message,
            "gpu-0 GPU 0 (NVIDIA GeForce RTX 4090): memory wall 10Gi, 100% of its compute"
        );
        let entry = status[1].entry("2026-12-07T16:00:00Z");
        assert_eq!(entry["shareID"], "s2");
        assert_eq!(entry["driver"], DRIVER_NAME);
        assert_eq!(entry["conditions"][0]["type"], READY);
        assert_eq!(entry["conditions"][0]["status"], "True");
    }

    #[test]
    fn a_repeated_prepare_is_up_to_date_and_a_changed_one_is_not() {
        let devices = [device("gpu-0-slice-1", None, 4 << 30, 25)];
        let desired = DeviceStatus::of_claim(&devices, &inventory());
        let written: Vec<Value> = desired
            .iter()
            .map(|d| d.entry("2026-12-07T16:00:00Z"))
            .collect();
        assert!(up_to_date(&written, &desired));
        assert!(!up_to_date(&[], &desired));
        let mut stale = written.clone();
        stale[0]["conditions"][0]["status"] = json!("False");
        assert!(!up_to_date(&stale, &desired));
        let mut other = written.clone();
        other[0]["data"]["memoryLimit"] = json!("8Gi");
        assert!(!up_to_date(&other, &desired));
        let mut extra = written.clone();
        extra.push(written[0].clone());
        assert!(!up_to_date(&extra, &desired));
    }
}
