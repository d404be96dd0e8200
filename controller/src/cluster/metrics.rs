//! `/metrics` of the cluster controller: per GPU and per claim gauges from the [`ClusterView`].
//! Prometheus conventions: base units in the names (`_bytes`, `_seconds`, `_ratio`), counters end
//! in `_total`; compute is a ratio of one GPU (1 = the whole GPU, DRA's `cores` capacity / 100).
//! The GPU label is `gpu_uuid`, as in the kubelet plugin's per-claim metrics, so the two join.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::view::ClusterView;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuLabels {
    pub node: String,
    pub gpu_uuid: String,
    pub product: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClaimLabels {
    pub namespace: String,
    pub claim: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClaimPodLabels {
    pub namespace: String,
    pub claim: String,
    pub pod: String,
}

type RatioGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

#[derive(Clone, Default)]
pub struct ClusterMetrics {
    pub gpu_memory_capacity: Family<GpuLabels, Gauge>,
    pub gpu_memory_allocated: Family<GpuLabels, Gauge>,
    pub gpu_cores_allocated: Family<GpuLabels, RatioGauge>,
    pub gpu_shares: Family<GpuLabels, Gauge>,
    pub claim_memory: Family<ClaimLabels, Gauge>,
    pub claim_cores: Family<ClaimLabels, RatioGauge>,
    pub claim_devices: Family<ClaimLabels, Gauge>,
    pub claim_pod: Family<ClaimPodLabels, Gauge>,
    pub reconcile_errors: prometheus_client::metrics::counter::Counter,
    pub last_reconcile_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl ClusterMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("tessera");
        r.register(
            "gpu_memory_capacity_bytes",
            "GPU memory offered in ResourceSlices",
            self.gpu_memory_capacity.clone(),
        );
        r.register(
            "gpu_memory_allocated_bytes",
            "GPU memory held by allocated claims",
            self.gpu_memory_allocated.clone(),
        );
        r.register(
            "gpu_cores_allocated_ratio",
            "Compute held by allocated claims, ratio of the GPU (1 = all of it)",
            self.gpu_cores_allocated.clone(),
        );
        r.register(
            "gpu_shares_allocated",
            "Allocated devices or consumable shares on the GPU",
            self.gpu_shares.clone(),
        );
        r.register(
            "claim_memory_bytes",
            "GPU memory a claim holds",
            self.claim_memory.clone(),
        );
        r.register(
            "claim_cores_ratio",
            "Compute a claim holds, in GPUs (0.25 = a quarter of one GPU)",
            self.claim_cores.clone(),
        );
        r.register(
            "claim_devices",
            "Tessera devices or shares a claim holds",
            self.claim_devices.clone(),
        );
        r.register(
            "claim_pod_info",
            "1 for each pod a claim is reserved for: joins per-claim series with pods",
            self.claim_pod.clone(),
        );
        r.register(
            "controller_reconcile_errors",
            "Failed reconciles",
            self.reconcile_errors.clone(),
        );
        r.register(
            "controller_reconcile_duration_seconds",
            "Duration of the last reconcile",
            self.last_reconcile_seconds.clone(),
        );
    }

    /// Replaces every per-GPU and per-claim series with the view's (gone GPUs and claims vanish).
    pub fn update(&self, view: &ClusterView) {
        for f in [
            &self.gpu_memory_capacity,
            &self.gpu_memory_allocated,
            &self.gpu_shares,
        ] {
            f.clear();
        }
        self.gpu_cores_allocated.clear();
        for f in [&self.claim_memory, &self.claim_devices] {
            f.clear();
        }
        self.claim_pod.clear();
        self.claim_cores.clear();
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        // `cores` capacity is out of 100 per GPU.
        let ratio = |cores: u64| cores as f64 / 100.0;
        for gpu in view.gpus.values() {
            let l = GpuLabels {
                node: gpu.node.clone(),
                gpu_uuid: gpu.uuid.clone(),
                product: gpu.product.clone(),
            };
            self.gpu_memory_capacity
                .get_or_create(&l)
                .set(g(gpu.memory_capacity_bytes));
            self.gpu_memory_allocated
                .get_or_create(&l)
                .set(g(gpu.memory_allocated_bytes));
            self.gpu_cores_allocated
                .get_or_create(&l)
                .set(ratio(gpu.cores_allocated));
            self.gpu_shares.get_or_create(&l).set(g(gpu.shares));
        }
        for c in &view.claims {
            let l = ClaimLabels {
                namespace: c.namespace.clone(),
                claim: c.name.clone(),
            };
            self.claim_memory.get_or_create(&l).set(g(c.memory_bytes));
            self.claim_cores.get_or_create(&l).set(ratio(c.cores));
            self.claim_devices.get_or_create(&l).set(g(c.devices));
            for pod in &c.pods {
                let l = ClaimPodLabels {
                    namespace: c.namespace.clone(),
                    claim: c.name.clone(),
                    pod: pod.clone(),
                };
                self.claim_pod.get_or_create(&l).set(1);
            }
        }
    }
}
