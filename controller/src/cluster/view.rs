//! The cluster's allocation view, from ResourceSlices and ResourceClaims as JSON of any
//! `resource.k8s.io` version: per GPU what is offered and allocated, per claim what it holds.
//! Pure, so the 1,000-node benchmark measures exactly what a reconcile computes.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::Value;
use tessera_api::names::{DRIVER_NAME, attribute, capacity};
use tessera_driver::DeviceName;

/// One physical GPU (node, uuid).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GpuView {
    pub node: String,
    pub uuid: String,
    pub product: String,
    pub memory_capacity_bytes: u64,
    /// Allocation results (devices or shares) on this GPU.
    pub shares: u64,
    pub memory_allocated_bytes: u64,
    /// Out of 100 per GPU.
    pub cores_allocated: u64,
}

/// What one claim holds of Tessera's devices.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClaimView {
    pub namespace: String,
    pub name: String,
    /// Pods the claim is reserved for (`status.reservedFor`), so usage can be read per pod.
    pub pods: Vec<String>,
    pub devices: u64,
    pub memory_bytes: u64,
    pub cores: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterView {
    /// By (node, uuid).
    pub gpus: BTreeMap<(String, String), GpuView>,
    pub claims: Vec<ClaimView>,
    /// Product names present, for per-model DeviceClasses.
    pub products: BTreeSet<String>,
    /// Allocated devices whose slice is not (or no longer) published.
    pub unknown_devices: u64,
    /// Every published device of Tessera's pools: pool → device names.
    pub devices: BTreeMap<String, BTreeSet<String>>,
}

struct DeviceInfo {
    gpu: (String, String),
    memory: u64,
    cores: u64,
}

fn quantity(v: &Value) -> Option<u64> {
    let text = v.as_str().or_else(|| v["value"].as_str())?;
    tessera_driver::quantity::parse(text).ok()
}

pub fn build_view(slices: &[Value], claims: &[Value]) -> ClusterView {
    let mut view = ClusterView::default();
    // Consumers use only a pool's newest generation.
    let mut newest: HashMap<&str, i64> = HashMap::new();
    for s in slices.iter().filter(|s| s["spec"]["driver"] == DRIVER_NAME) {
        let (Some(pool), Some(g)) = (
            s["spec"]["pool"]["name"].as_str(),
            s["spec"]["pool"]["generation"].as_i64(),
        ) else {
            continue;
        };
        let e = newest.entry(pool).or_insert(g);
        *e = (*e).max(g);
    }
    let mut devices: HashMap<(String, String), DeviceInfo> = HashMap::new();
    for s in slices.iter().filter(|s| s["spec"]["driver"] == DRIVER_NAME) {
        let Some(pool) = s["spec"]["pool"]["name"].as_str() else {
            continue;
        };
        if s["spec"]["pool"]["generation"].as_i64() != newest.get(pool).copied() {
            continue;
        }
        let node = s["spec"]["nodeName"].as_str().unwrap_or(pool);
        for d in s["spec"]["devices"].as_array().into_iter().flatten() {
            let body = if d.get("basic").is_some() {
                &d["basic"]
            } else {
                d
            };
            let (Some(name), Some(uuid)) = (
                d["name"].as_str(),
                body["attributes"][attribute::UUID]["string"].as_str(),
            ) else {
                continue;
            };
            let product = body["attributes"][attribute::PRODUCT_NAME]["string"]
                .as_str()
                .unwrap_or_default();
            let memory = quantity(&body["capacity"][capacity::MEMORY]).unwrap_or(0);
            let cores = quantity(&body["capacity"][capacity::CORES]).unwrap_or(0);
            // The card's memory: a whole device shows it; an n-th slice shows about 1/n of it.
            let parts = match DeviceName::parse(name) {
                Ok(DeviceName::Whole { .. }) => 1,
                Ok(DeviceName::Slice { of, .. }) => u64::from(of),
                _ => 0,
            };
            let key = (node.to_string(), uuid.to_string());
            let gpu = view.gpus.entry(key.clone()).or_insert_with(|| GpuView {
                node: node.to_string(),
                uuid: uuid.to_string(),
                product: product.to_string(),
                ..GpuView::default()
            });
            gpu.memory_capacity_bytes = gpu.memory_capacity_bytes.max(memory * parts);
            if !product.is_empty() {
                view.products.insert(product.to_string());
            }
            view.devices
                .entry(pool.to_string())
                .or_default()
                .insert(name.to_string());
            devices.insert(
                (pool.to_string(), name.to_string()),
                DeviceInfo {
                    gpu: key,
                    memory,
                    cores,
                },
            );
        }
    }
    for c in claims {
        let mut claim = ClaimView {
            namespace: c["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            name: c["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            ..ClaimView::default()
        };
        let results = c["status"]["allocation"]["devices"]["results"].as_array();
        for r in results
            .into_iter()
            .flatten()
            .filter(|r| r["driver"] == DRIVER_NAME)
        {
            let key = (
                r["pool"].as_str().unwrap_or_default().to_string(),
                r["device"].as_str().unwrap_or_default().to_string(),
            );
            let Some(info) = devices.get(&key) else {
                view.unknown_devices += 1;
                continue;
            };
            // Admin access (a monitoring or debugging claim) takes nothing from the GPU.
            if r["adminAccess"] == true {
                claim.devices += 1;
                continue;
            }
            // Consumable mode: the share's consumed capacity; otherwise the device's own.
            let consumed = &r["consumedCapacity"];
            let memory = quantity(&consumed[capacity::MEMORY]).unwrap_or(info.memory);
            let cores = quantity(&consumed[capacity::CORES]).unwrap_or(info.cores);
            if let Some(gpu) = view.gpus.get_mut(&info.gpu) {
                gpu.shares += 1;
                gpu.memory_allocated_bytes += memory;
                gpu.cores_allocated += cores;
            }
            claim.devices += 1;
            claim.memory_bytes += memory;
            claim.cores += cores;
        }
        claim.pods = c["status"]["reservedFor"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["resource"] == "pods")
            .filter_map(|r| r["name"].as_str().map(str::to_owned))
            .collect();
        if claim.devices > 0 {
            view.claims.push(claim);
        }
    }
    view
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sums_shares_per_gpu_and_claim() {
        let slices = vec![
            json!({"spec": {"driver": DRIVER_NAME, "nodeName": "n", "pool": {"name": "n", "generation": 2}, "devices": [
                {"name": "gpu-0", "allowMultipleAllocations": true, "attributes": {"uuid": {"string": "GPU-a"}, "productName": {"string": "L40S"}},
                 "capacity": {"memory": {"value": "48Gi"}, "cores": {"value": "100"}}}]}}),
            // An old generation is ignored.
            json!({"spec": {"driver": DRIVER_NAME, "nodeName": "n", "pool": {"name": "n", "generation": 1}, "devices": [
                {"name": "gpu-0", "basic": {"attributes": {"uuid": {"string": "GPU-old"}}, "capacity": {"memory": "1Gi"}}}]}}),
        ];
        let claim = |name: &str, mem: &str| {
            json!({"metadata": {"namespace": "default", "name": name}, "status": {"allocation": {"devices": {"results": [
            {"driver": DRIVER_NAME, "pool": "n", "device": "gpu-0", "consumedCapacity": {"memory": mem, "cores": "25"}}]}}}})
        };
        let mut admin = claim("monitor", "8Gi");
        admin["status"]["allocation"]["devices"]["results"][0]["adminAccess"] = json!(true);
        let view = build_view(&slices, &[claim("a", "8Gi"), claim("b", "4Gi"), admin]);
        let gpu = &view.gpus[&("n".to_string(), "GPU-a".to_string())];
        assert_eq!(
            (
                gpu.shares,
                gpu.memory_allocated_bytes,
                gpu.cores_allocated,
                gpu.memory_capacity_bytes
            ),
            (2, 12 << 30, 50, 48 << 30),
            "an admin-access claim takes nothing"
        );
        assert_eq!(view.gpus.len(), 1);
        assert_eq!(view.claims[1].memory_bytes, 4 << 30);
        assert_eq!(view.products, BTreeSet::from(["L40S".to_string()]));
    }

    #[test]
    fn a_claims_pods_come_from_reserved_for() {
        let slices = vec![
            json!({"spec": {"driver": DRIVER_NAME, "nodeName": "n", "pool": {"name": "n", "generation": 1}, "devices": [
            {"name": "gpu-0", "attributes": {"uuid": {"string": "GPU-a"}, "productName": {"string": "L40S"}},
             "capacity": {"memory": {"value": "48Gi"}, "cores": {"value": "100"}}}]}}),
        ];
        let claim = json!({"metadata": {"namespace": "ml", "name": "train-gpu-x"}, "status": {
            "allocation": {"devices": {"results": [{"driver": DRIVER_NAME, "pool": "n", "device": "gpu-0"}]}},
            "reservedFor": [{"resource": "pods", "name": "train", "uid": "1"}, {"resource": "jobs", "name": "not-a-pod", "uid": "2"}]}});
        let view = build_view(&slices, &[claim]);
        assert_eq!(view.claims[0].pods, vec!["train".to_string()]);
        let metrics = super::super::metrics::ClusterMetrics::default();
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        metrics.update(&view);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains(
                r#"tessera_claim_pod_info{namespace="ml",claim="train-gpu-x",pod="train"} 1"#
            ),
            "{text}"
        );
    }
}
