//! Device metadata for workloads (KEP-5304, beta in 1.37): each prepared request's devices, with
//! their attributes, in a file its containers read at a well-known path:
//!
//! - `/var/run/kubernetes.io/dra-device-attributes/resourceclaims/<claim>/<request>/gpu.tessera.dev-metadata.json`
//!   for a claim the pod names;
//! - `…/resourceclaimtemplates/<pod's claim name>/<request>/gpu.tessera.dev-metadata.json` for a
//!   claim made from a template (its generated name cannot be known when the pod is written).
//!
//! The file is a stream of the same `DeviceMetadata` object encoded once per API version, newest
//! first (`metadata.resource.k8s.io/v1beta1`, then `v1alpha1`), as Kubernetes'
//! `devicemetadata` decoder reads it. It lives in the claim's directory on the host (so it goes
//! with the claim) and is bind-mounted read-only by one more device of the claim's CDI spec,
//! whose ID goes with the first device of its request.
//!
//! Each device carries its GPU's attributes as the node's ResourceSlices publish them, plus what
//! the claim got on it: `memoryLimit` (bytes) and `cores` (percent of the GPU), or
//! `adminAccess: true` for a device held with admin access (no wall).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};
use tessera_api::names::DRIVER_NAME;
use tessera_controller::slices::build::attributes;
use tessera_controller::slices::model::Attribute;
use tessera_controller::slices::render::attribute_json;
use tessera_controller::slices::{is_dns_label, is_dns_subdomain};
use tessera_driver::Inventory;
use tessera_driver::allocation::AllocatedDevice;

/// Where containers find the files.
pub const CONTAINER_DIR: &str = "/var/run/kubernetes.io/dra-device-attributes";

/// The versions each file holds, newest first.
pub const VERSIONS: [&str; 2] = [
    "metadata.resource.k8s.io/v1beta1",
    "metadata.resource.k8s.io/v1alpha1",
];

/// The file's name in its request's directory.
pub fn file_name() -> String {
    format!("{DRIVER_NAME}-metadata.json")
}

/// One request's metadata: what to write where, and where containers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestMetadata {
    /// The claim's request (without a subrequest): the kubelet's request name.
    pub request: String,
    pub host_file: PathBuf,
    pub container_path: String,
    pub stream: Vec<u8>,
}

/// The claim whose metadata is written.
pub struct ClaimNames<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    pub pod_claim_name: Option<&'a str>,
}

/// The metadata of each request of `devices` (each with its request reference as allocated,
/// `<request>` or `<request>/<subrequest>`), written under `claim_dir`. A request whose names
/// could not form a path (the API server validates them, so never in practice) gets none.
pub fn for_claim(
    claim: &ClaimNames<'_>,
    devices: &[(&str, &AllocatedDevice)],
    inventory: &Inventory,
    claim_dir: &Path,
) -> Vec<RequestMetadata> {
    let mut by_request: BTreeMap<&str, (&str, Vec<&AllocatedDevice>)> = BTreeMap::new();
    for &(reference, device) in devices {
        by_request
            .entry(device.request.as_str())
            .or_insert((reference, Vec::new()))
            .1
            .push(device);
    }
    let (dir, claim_key) = match claim.pod_claim_name {
        Some(pod_name) => ("resourceclaimtemplates", pod_name),
        None => ("resourceclaims", claim.name),
    };
    if !is_dns_subdomain(claim_key) {
        return Vec::new();
    }
    by_request
        .into_iter()
        .filter(|(request, _)| is_dns_label(request))
        .map(|(request, (reference, devices))| {
            let object = |api_version: &str| {
                let mut object = json!({
                    "kind": "DeviceMetadata",
                    "apiVersion": api_version,
                    "metadata": {
                        "name": claim.name,
                        "namespace": claim.namespace,
                        "uid": claim.uid,
                        "generation": 1,
                    },
                    "requests": [{
                        "name": reference,
                        "devices": devices.iter().map(|d| device_json(d, inventory)).collect::<Vec<_>>(),
                    }],
                });
                if let Some(pod_name) = claim.pod_claim_name {
                    object["podClaimName"] = json!(pod_name);
                }
                object
            };
            let mut stream = Vec::new();
            for version in VERSIONS {
                // A `Value` always serialises.
                stream.extend(serde_json::to_vec_pretty(&object(version)).unwrap_or_default());
                stream.push(b'\n');
            }
            RequestMetadata {
                request: request.to_owned(),
                host_file: claim_dir.join("metadata").join(request).join(file_name()),
                container_path: format!(
                    "{CONTAINER_DIR}/{dir}/{claim_key}/{request}/{}",
                    file_name()
                ),
                stream,
            }
        })
        .collect()
}

fn device_json(device: &AllocatedDevice, inventory: &Inventory) -> Value {
    let mut attrs: Map<String, Value> = inventory
        .gpus
        .iter()
        .find(|g| g.uuid == device.gpu_uuid)
        .map(|gpu| {
            attributes(inventory, gpu)
                .iter()
                .map(|(k, a)| (k.clone(), attribute_json(a)))
                .collect()
        })
        .unwrap_or_default();
    let share: [(&str, Attribute); 2] = if device.admin_access {
        [
            ("adminAccess", Attribute::Bool(true)),
            ("uuid", Attribute::String(device.gpu_uuid.clone())),
        ]
    } else {
        [
            (
                "memoryLimit",
                Attribute::Int(i64::try_from(device.memory).unwrap_or(i64::MAX)),
            ),
            ("cores", Attribute::Int(device.cores.into())),
        ]
    };
    for (key, value) in share {
        attrs.insert(key.to_owned(), attribute_json(&value));
    }
    json!({
        "driver": DRIVER_NAME,
        "pool": device.pool,
        "name": device.device,
        "attributes": attrs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(request: &str, name: &str, memory: u64, cores: u32) -> AllocatedDevice {
        AllocatedDevice {
            request: request.into(),
            pool: "node-a".into(),
            device: name.into(),
            share_id: None,
            gpu_uuid: "GPU-a".into(),
            gpu_index: 0,
            gpu_minor: 0,
            memory,
            cores,
            admin_access: false,
        }
    }

    fn inventory() -> Inventory {
        serde_json::from_value(json!({
            "driverVersion": "570.86.15",
            "gpus": [{ "index": 0, "minor": 0, "uuid": "GPU-a", "productName": "NVIDIA L4",
                       "memory": 24u64 << 30, "cudaComputeCapability": "8.9" }],
        }))
        .expect("inventory")
    }

    fn objects(stream: &[u8]) -> Vec<Value> {
        serde_json::Deserializer::from_slice(stream)
            .into_iter::<Value>()
            .collect::<Result<_, _>>()
            .expect("a JSON stream")
    }

    #[test]
    fn a_template_claim_is_found_by_the_pods_name_for_it_in_both_versions() {
        let claim = ClaimNames {
            namespace: "team-a",
            name: "train-gpu-x7k2p",
            uid: "uid-1",
            pod_claim_name: Some("gpu"),
        };
        let d = device("gpu", "gpu-0", 4 << 30, 25);
        let written = for_claim(
            &claim,
            &[("gpu/l4", &d)],
            &inventory(),
            Path::new("/state/claims/uid-1"),
        );
        assert_eq!(written.len(), 1);
        let request = &written[0];
        assert_eq!(
            request.container_path,
            "/var/run/kubernetes.io/dra-device-attributes/resourceclaimtemplates/gpu/gpu/gpu.tessera.dev-metadata.json"
        );
        assert_eq!(
            request.host_file,
            Path::new("/state/claims/uid-1/metadata/gpu/gpu.tessera.dev-metadata.json")
        );
        let objects = objects(&request.stream);
        assert_eq!(
            objects
                .iter()
                .map(|o| o["apiVersion"].as_str().unwrap_or_default())
                .collect::<Vec<_>>(),
            VERSIONS
        );
        for o in &objects {
            assert_eq!(o["kind"], "DeviceMetadata");
            assert_eq!(o["podClaimName"], "gpu");
            assert_eq!(o["metadata"]["name"], "train-gpu-x7k2p");
            assert_eq!(o["metadata"]["uid"], "uid-1");
            assert_eq!(o["requests"][0]["name"], "gpu/l4");
            let dev = &o["requests"][0]["devices"][0];
            assert_eq!(
                (&dev["driver"], &dev["pool"], &dev["name"]),
                (&json!(DRIVER_NAME), &json!("node-a"), &json!("gpu-0"))
            );
            assert_eq!(dev["attributes"]["uuid"], json!({ "string": "GPU-a" }));
            assert_eq!(
                dev["attributes"]["productName"],
                json!({ "string": "NVIDIA L4" })
            );
            assert_eq!(
                dev["attributes"]["memoryLimit"],
                json!({ "int": 4u64 << 30 })
            );
            assert_eq!(dev["attributes"]["cores"], json!({ "int": 25 }));
        }
    }

    #[test]
    fn a_named_claim_is_found_by_its_name_and_names_that_are_not_labels_get_nothing() {
        let claim = ClaimNames {
            namespace: "team-a",
            name: "shared-gpu",
            uid: "uid-2",
            pod_claim_name: None,
        };
        let a = device("infer", "gpu-0", 1 << 30, 10);
        let bad = device("../x", "gpu-0", 1 << 30, 10);
        let written = for_claim(
            &claim,
            &[("infer", &a), ("../x", &bad)],
            &inventory(),
            Path::new("/c"),
        );
        assert_eq!(written.len(), 1, "{written:?}");
        assert_eq!(
            written[0].container_path,
            "/var/run/kubernetes.io/dra-device-attributes/resourceclaims/shared-gpu/infer/gpu.tessera.dev-metadata.json"
        );
        assert!(objects(&written[0].stream)[0].get("podClaimName").is_none());
    }
}
