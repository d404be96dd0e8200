//! `/metrics` of the cluster controller: per GPU and per claim gauges from the [`ClusterView`].
//! Units are in the names (`_bytes`, `_percent`); cores are percent of one GPU.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::view::ClusterView;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuLabels {
    pub node: String,
    pub uuid: String,
    pub product: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClaimLabels {
    pub namespace: String,
    pub claim: String,
}

#[derive(Clone, Default)]
pub struct ClusterMetrics {
    pub gpu_memory_capacity: Family<GpuLabels, Gauge>,
    pub gpu_memory_allocated: Family<GpuLabels, Gauge>,
    pub gpu_cores_allocated: Family<GpuLabels, Gauge>,
    pub gpu_shares: Family<GpuLabels, Gauge>,
    pub claim_memory: Family<ClaimLabels, Gauge>,
    pub claim_cores: Family<ClaimLabels, Gauge>,
    pub claim_devices: Family<ClaimLabels, Gauge>,
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
            "gpu_cores_allocated_percent",
            "Compute held by allocated claims, percent of one GPU",
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
            "claim_cores_percent",
            "Compute a claim holds, percent of one GPU",
            self.claim_cores.clone(),
        );
        r.register(
            "claim_devices",
            "Tessera devices or shares a claim holds",
            self.claim_devices.clone(),
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
            &self.gpu_cores_allocated,
            &self.gpu_shares,
        ] {
            f.clear();
        }
        for f in [&self.claim_memory, &self.claim_cores, &self.claim_devices] {
            f.clear();
        }
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for gpu in view.gpus.values() {
            let l = GpuLabels {
                node: gpu.node.clone(),
                uuid: gpu.uuid.clone(),
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
                .set(g(gpu.cores_allocated));
            self.gpu_shares.get_or_create(&l).set(g(gpu.shares));
        }
        for c in &view.claims {
            let l = ClaimLabels {
                namespace: c.namespace.clone(),
                claim: c.name.clone(),
            };
            self.claim_memory.get_or_create(&l).set(g(c.memory_bytes));
            self.claim_cores.get_or_create(&l).set(g(c.cores));
            self.claim_devices.get_or_create(&l).set(g(c.devices));
        }
    }
}
