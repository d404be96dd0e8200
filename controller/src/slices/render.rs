//! Renders a [`PoolPlan`] as ResourceSlice objects of one `resource.k8s.io` version, as JSON, so
//! one code path serves the typed versions and v1alpha3 (which k8s-openapi 0.29 no longer ships)
//! alike, through `DynamicObject`.

use serde_json::{Map, Value, json};
use tessera_api::names::DRIVER_NAME;

use super::model::*;

/// The `resource.k8s.io` versions that carry ResourceSlices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ApiVersion {
    /// 1.34+.
    V1,
    /// 1.33.
    V1beta2,
    /// 1.32: devices wrapped in `basic:`, capacity `{value:}`.
    V1beta1,
    /// 1.31: `basic:`, capacity as plain quantities.
    V1alpha3,
}

impl ApiVersion {
    /// Newest first: the order in which a served version is preferred.
    pub const ALL: [ApiVersion; 4] = [
        ApiVersion::V1,
        ApiVersion::V1beta2,
        ApiVersion::V1beta1,
        ApiVersion::V1alpha3,
    ];

    pub fn version(&self) -> &'static str {
        match self {
            ApiVersion::V1 => "v1",
            ApiVersion::V1beta2 => "v1beta2",
            ApiVersion::V1beta1 => "v1beta1",
            ApiVersion::V1alpha3 => "v1alpha3",
        }
    }

    pub fn api_version(&self) -> String {
        format!("resource.k8s.io/{}", self.version())
    }

    pub fn parse(version: &str) -> Option<ApiVersion> {
        ApiVersion::ALL.into_iter().find(|v| v.version() == version)
    }

    /// Whether the version has the fields a mode needs at all (a gate may still drop them).
    pub fn supports(&self, mode: SharingMode) -> bool {
        match mode {
            SharingMode::Consumable | SharingMode::Partitioned => {
                matches!(self, ApiVersion::V1 | ApiVersion::V1beta2)
            }
            SharingMode::Fixed { .. } | SharingMode::Exclusive => true,
        }
    }

    fn basic_wrapper(&self) -> bool {
        matches!(self, ApiVersion::V1beta1 | ApiVersion::V1alpha3)
    }
}

/// What a slice object needs beyond its contents.
#[derive(Clone, Debug)]
pub struct SliceMeta<'a> {
    pub generation: i64,
    /// The Node's UID, for the owner reference that lets the garbage collector remove the slices
    /// with the Node; `None` leaves the reference out (tests without a Node).
    pub node_uid: Option<&'a str>,
}

/// The slice name of index `i` in `node`'s pool: `<node>-gpu.tessera.dev-<i>`, shortened (with a
/// hash to stay unique) where a long node name would pass the 253-character limit.
pub fn slice_name(node: &str, i: usize) -> String {
    let suffix = format!("-{DRIVER_NAME}-{i}");
    if node.len() + suffix.len() <= 253 {
        return format!("{node}{suffix}");
    }
    let hash = node.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    });
    let keep = 253 - suffix.len() - 17;
    format!(
        "{}-{hash:016x}{suffix}",
        node[..keep].trim_end_matches(['-', '.'])
    )
}

/// Label on every slice, so tools can find Tessera's slices of a node cheaply.
pub const POOL_LABEL: &str = "gpu.tessera.dev/pool";

/// All slice objects of the pool.
pub fn render_pool(plan: &PoolPlan, version: ApiVersion, meta: &SliceMeta<'_>) -> Vec<Value> {
    let count = plan.slices.len();
    plan.slices
        .iter()
        .enumerate()
        .map(|(i, s)| render_slice(plan, i, count, s, version, meta))
        .collect()
}

fn render_slice(
    plan: &PoolPlan,
    i: usize,
    count: usize,
    slice: &SliceContent,
    version: ApiVersion,
    meta: &SliceMeta<'_>,
) -> Value {
    let mut metadata = json!({ "name": slice_name(&plan.node, i) });
    if plan.pool.len() <= 63 {
        metadata["labels"] = json!({ POOL_LABEL: plan.pool });
    }
    if let Some(uid) = meta.node_uid {
        metadata["ownerReferences"] = json!([{
            "apiVersion": "v1", "kind": "Node", "name": plan.node, "uid": uid, "controller": true,
        }]);
    }
    let mut spec = json!({
        "driver": DRIVER_NAME,
        "nodeName": plan.node,
        "pool": { "name": plan.pool, "generation": meta.generation, "resourceSliceCount": count },
    });
    if !slice.counter_sets.is_empty() {
        spec["sharedCounters"] = slice
            .counter_sets
            .iter()
            .map(|set| json!({ "name": set.name, "counters": counters(&set.counters) }))
            .collect();
    }
    if !slice.devices.is_empty() {
        spec["devices"] = slice
            .devices
            .iter()
            .map(|d| render_device(d, version))
            .collect();
    }
    json!({ "apiVersion": version.api_version(), "kind": "ResourceSlice", "metadata": metadata, "spec": spec })
}

fn counters(counters: &std::collections::BTreeMap<String, u64>) -> Value {
    counters
        .iter()
        .map(|(k, v)| (k.clone(), json!({ "value": v.to_string() })))
        .collect::<Map<_, _>>()
        .into()
}

/// An attribute as the API writes it (`DeviceAttribute`: `{"int": …}`, `{"string": …}`, …).
pub fn attribute_json(attribute: &Attribute) -> Value {
    match attribute {
        Attribute::Int(i) => json!({ "int": i }),
        Attribute::Bool(b) => json!({ "bool": b }),
        Attribute::String(s) => json!({ "string": s }),
        Attribute::Version(s) => json!({ "version": s }),
    }
}

fn render_device(device: &Device, version: ApiVersion) -> Value {
    let attributes: Map<String, Value> = device
        .attributes
        .iter()
        .map(|(k, a)| (k.clone(), attribute_json(a)))
        .collect();
    let capacity: Map<String, Value> = device
        .capacity
        .iter()
        .map(|(k, c)| {
            let value = c.value.to_string();
            let v = match (version, c.policy) {
                (ApiVersion::V1alpha3, _) => json!(value),
                (_, None) => json!({ "value": value }),
                (_, Some(p)) => json!({ "value": value, "requestPolicy": {
                    "default": p.default.to_string(),
                    "validRange": { "min": p.min.to_string(), "max": p.max.to_string(), "step": p.step.to_string() },
                } }),
            };
            (k.clone(), v)
        })
        .collect();
    let mut body = json!({ "attributes": attributes, "capacity": capacity });
    if !device.consumes_counters.is_empty() {
        body["consumesCounters"] = device
            .consumes_counters
            .iter()
            .map(|c| json!({ "counterSet": c.counter_set, "counters": counters(&c.counters) }))
            .collect();
    }
    if device.allow_multiple_allocations {
        body["allowMultipleAllocations"] = json!(true);
    }
    // Only v1 carries taints here: 1.33's v1beta1/v1beta2 had them as an alpha off by default,
    // and the node controller withdraws an unhealthy GPU's devices on those releases instead.
    if version == ApiVersion::V1 && !device.taints.is_empty() {
        body["taints"] = device
            .taints
            .iter()
            .map(|t| {
                let mut taint = json!({ "key": t.key, "effect": t.effect.as_str() });
                if !t.value.is_empty() {
                    taint["value"] = json!(t.value);
                }
                taint
            })
            .collect();
    }
    if version.basic_wrapper() {
        json!({ "name": device.name, "basic": body })
    } else {
        let mut d = json!({ "name": device.name });
        if let (Some(d), Value::Object(b)) = (d.as_object_mut(), body) {
            d.extend(b);
        }
        d
    }
}
