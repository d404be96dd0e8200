//! Node metrics, served on `--metrics-address` at `/metrics` (OpenMetrics text).
//!
//! Call metrics are kept as they happen. Claim metrics are read at scrape time from the
//! checkpoint (which claims, which GPUs, what limits) and from each claim's region (memory in
//! use, summed over live processes only), so a plugin restart loses nothing and two plugin
//! instances report the same values.
//!
//! Names follow Prometheus conventions (base units `_bytes`, `_seconds`, `_ratio`; counters end in
//! `_total`); the reference is `docs/reference/metrics.md`.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `tessera_prepare_duration_seconds` | histogram | — (one NodePrepareResources call) |
//! | `tessera_prepared_claims_total` / `tessera_prepare_errors_total` | counter | — (a claim's failed answers, each kubelet retry counted) |
//! | `tessera_prepare_refusals_total` | counter | reason (invalid, priority, card_room): the failed answers that are refusals |
//! | `tessera_unprepared_claims_total` / `tessera_unprepare_errors_total` | counter | — |
//! | `tessera_claim_status_writes_total` | counter | outcome (written, cleared, gone, not_served, dropped, failed) |
//! | `tessera_claims_prepared` | gauge | — |
//! | `tessera_kubelet_health_streams` | gauge | — (the kubelet's open `DRAResourceHealth` streams: 1 where it watches) |
//! | `tessera_gpu_healthy` | gauge | gpu_uuid, product (1 healthy, 0 tainted or withdrawn; every GPU of the start-up inventory) |
//! | `tessera_gpu_memory_physical_bytes` | gauge | gpu_uuid, product (the card's memory, beside what the slices offer) |
//! | `tessera_gpu_driver_memory_wall` | gauge | gpu_uuid, product (1: the driver also holds each claim's containers to the claim's memory, NVML 13.4; 0: the shim's wall alone) |
//! | `tessera_gpu_context_overhead_bytes` | gauge | gpu_uuid, product, source (measured, configured, fallback, unmeasured): what each CUDA context is charged |
//! | `tessera_claim_memory_used_bytes` | gauge | namespace, claim, claim_uid, gpu_uuid |
//! | `tessera_claim_memory_limit_bytes` | gauge | same |
//! | `tessera_claim_memory_spilled_bytes` | gauge | same (host memory; 0 until the shim spills) |
//! | `tessera_claim_cores_limit_ratio` | gauge | same (1 = the whole GPU) |
//! | `tessera_claim_gpu_busy_seconds_total` | counter | same (GPU time the claim's kernels took; its rate is the achieved share) |
//! | `tessera_claim_processes` | gauge | namespace, claim, claim_uid |
//! | `tessera_claim_admin_access` | gauge | namespace, claim, claim_uid, gpu_uuid (1: admin access, no wall; such a claim has no limit, usage or cores series) |

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tessera_driver::checkpoint::{Checkpoint, ClaimState};
use tessera_driver::health::NodeGpus;

use crate::regions;

/// The plugin's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    prepare_duration: Histogram,
    prepared: Counter,
    prepare_errors: Counter,
    unprepared: Counter,
    unprepare_errors: Counter,
    status_writes: Family<StatusWriteLabels, Counter>,
    refusals: Family<RefusalLabels, Counter>,
    health_streams: Gauge,
    gpu_healthy: Family<GpuLabels, Gauge>,
    gpu_memory_physical: Family<GpuLabels, Gauge>,
    gpu_context_overhead: Family<ContextOverheadLabels, Gauge>,
    gpu_driver_memory_wall: Family<GpuLabels, Gauge>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct GpuLabels {
    gpu_uuid: String,
    product: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ContextOverheadLabels {
    gpu_uuid: String,
    product: String,
    source: &'static str,
}

/// How a write of a claim's `status.devices` ended (see `claims::status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StatusWrite {
    Written,
    Cleared,
    Gone,
    NotServed,
    Dropped,
    Failed,
}

impl StatusWrite {
    pub fn of(outcome: &crate::claims::status::Outcome) -> StatusWrite {
        use crate::claims::status::Outcome;
        match outcome {
            Outcome::Written => StatusWrite::Written,
            Outcome::Cleared => StatusWrite::Cleared,
            Outcome::Gone => StatusWrite::Gone,
            Outcome::NotServed(_) => StatusWrite::NotServed,
            Outcome::Dropped => StatusWrite::Dropped,
            Outcome::Failed(_) => StatusWrite::Failed,
        }
    }

    fn label(self) -> &'static str {
        match self {
            StatusWrite::Written => "written",
            StatusWrite::Cleared => "cleared",
            StatusWrite::Gone => "gone",
            StatusWrite::NotServed => "not_served",
            StatusWrite::Dropped => "dropped",
            StatusWrite::Failed => "failed",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StatusWriteLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefusalLabels {
    reason: &'static str,
}

impl Metrics {
    /// Metrics whose claim gauges read `<state_dir>`.
    pub fn new(state_dir: PathBuf) -> Metrics {
        let mut registry = Registry::with_prefix("tessera");
        // 0.5 ms … 4 s: prepare is milliseconds unless the API server or the disk is slow.
        let prepare_duration = Histogram::new([
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 4.0,
        ]);
        registry.register_with_unit(
            "prepare_duration",
            "Duration of NodePrepareResources calls, leaving out calls whose every claim was refused",
            Unit::Seconds,
            prepare_duration.clone(),
        );
        let prepared = Counter::default();
        registry.register(
            "prepared_claims",
            "Claims prepared successfully",
            prepared.clone(),
        );
        let prepare_errors = Counter::default();
        registry.register(
            "prepare_errors",
            "Claims whose preparation failed",
            prepare_errors.clone(),
        );
        let refusals = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "prepare_refusals",
            "Failed claim preparations that are refusals, by reason (invalid, priority, card_room)",
            refusals.clone(),
        );
        let unprepared = Counter::default();
        registry.register(
            "unprepared_claims",
            "Claims unprepared successfully",
            unprepared.clone(),
        );
        let unprepare_errors = Counter::default();
        registry.register(
            "unprepare_errors",
            "Claims whose unpreparation failed",
            unprepare_errors.clone(),
        );
        let status_writes = Family::<StatusWriteLabels, Counter>::default();
        registry.register(
            "claim_status_writes",
            "Writes of prepared claims' status.devices, by outcome",
            status_writes.clone(),
        );
        let health_streams = Gauge::default();
        registry.register(
            "kubelet_health_streams",
            "The kubelet's open DRAResourceHealth streams (1 where it watches device health)",
            health_streams.clone(),
        );
        let gpu_healthy = Family::<GpuLabels, Gauge>::default();
        registry.register(
            "gpu_healthy",
            "1 while the GPU is healthy, 0 while it is tainted or withdrawn for its health",
            gpu_healthy.clone(),
        );
        let gpu_memory_physical = Family::<GpuLabels, Gauge>::default();
        registry.register_with_unit(
            "gpu_memory_physical",
            "The GPU's own memory (its slices may offer more where the node overcommits it)",
            Unit::Bytes,
            gpu_memory_physical.clone(),
        );
        let gpu_context_overhead = Family::<ContextOverheadLabels, Gauge>::default();
        registry.register_with_unit(
            "gpu_context_overhead",
            "Device memory each CUDA context is charged against a claim's wall on the GPU",
            Unit::Bytes,
            gpu_context_overhead.clone(),
        );
        let gpu_driver_memory_wall = Family::<GpuLabels, Gauge>::default();
        registry.register(
            "gpu_driver_memory_wall",
            "1 where the NVIDIA driver also holds each claim's containers to the claim's memory on the GPU (per-cgroup limits), 0 where the shim's wall holds alone",
            gpu_driver_memory_wall.clone(),
        );
        registry.register_collector(Box::new(ClaimCollector { state_dir }));
        Metrics {
            registry,
            prepare_duration,
            prepared,
            prepare_errors,
            unprepared,
            unprepare_errors,
            status_writes,
            refusals,
            health_streams,
            gpu_healthy,
            gpu_memory_physical,
            gpu_context_overhead,
            gpu_driver_memory_wall,
        }
    }

    /// Sets `tessera_gpu_context_overhead_bytes` for every GPU of the node's inventory.
    pub fn observe_context_overhead(
        &self,
        inventory: &tessera_driver::Inventory,
        sources: &[(String, crate::context_overhead::Source)],
    ) {
        self.gpu_context_overhead.clear();
        for gpu in &inventory.gpus {
            let Some((_, source)) = sources.iter().find(|(uuid, _)| *uuid == gpu.uuid) else {
                continue;
            };
            self.gpu_context_overhead
                .get_or_create(&ContextOverheadLabels {
                    gpu_uuid: gpu.uuid.clone(),
                    product: gpu.product_name.clone(),
                    source: source.label(),
                })
                .set(i64::try_from(gpu.context_overhead).unwrap_or(i64::MAX));
        }
    }

    /// Sets `tessera_gpu_memory_physical_bytes` and `tessera_gpu_driver_memory_wall` for every GPU
    /// of the node's inventory.
    pub fn observe_inventory(&self, inventory: &tessera_driver::Inventory) {
        self.gpu_memory_physical.clear();
        self.gpu_driver_memory_wall.clear();
        for gpu in &inventory.gpus {
            self.gpu_driver_memory_wall
                .get_or_create(&GpuLabels {
                    gpu_uuid: gpu.uuid.clone(),
                    product: gpu.product_name.clone(),
                })
                .set(i64::from(gpu.driver_memory_wall));
            self.gpu_memory_physical
                .get_or_create(&GpuLabels {
                    gpu_uuid: gpu.uuid.clone(),
                    product: gpu.product_name.clone(),
                })
                .set(i64::try_from(gpu.memory).unwrap_or(i64::MAX));
        }
    }

    /// Sets `tessera_gpu_healthy` for every GPU of `gpus`.
    pub fn observe_gpu_health(&self, gpus: &NodeGpus) {
        self.gpu_healthy.clear();
        for gpu in &gpus.known.gpus {
            let healthy = !gpus.unhealthy.contains_key(&gpu.uuid);
            self.gpu_healthy
                .get_or_create(&GpuLabels {
                    gpu_uuid: gpu.uuid.clone(),
                    product: gpu.product_name.clone(),
                })
                .set(i64::from(healthy));
        }
    }

    /// Keeps `tessera_gpu_healthy` up to date with the health watcher until it stops.
    pub async fn follow_gpu_health(&self, mut gpus: tokio::sync::watch::Receiver<NodeGpus>) {
        loop {
            self.observe_gpu_health(&gpus.borrow_and_update());
            if gpus.changed().await.is_err() {
                return;
            }
        }
    }

    /// The gauge of the kubelet's open health streams.
    pub fn health_streams(&self) -> Gauge {
        self.health_streams.clone()
    }

    /// One NodePrepareResources call: `ok` claims prepared, `failed` not, of which those in
    /// `refused` (each its reason's label) were refusals. A call whose every claim was refused
    /// is not timed: refusals answer at once, and the histogram is the latency of preparing.
    pub fn observe_prepare(
        &self,
        duration: Duration,
        ok: usize,
        failed: usize,
        refused: impl IntoIterator<Item = &'static str>,
    ) {
        let mut refusals = 0;
        for reason in refused {
            refusals += 1;
            self.refusals.get_or_create(&RefusalLabels { reason }).inc();
        }
        if ok + failed > refusals {
            self.prepare_duration.observe(duration.as_secs_f64());
        }
        self.prepared.inc_by(ok as u64);
        self.prepare_errors.inc_by(failed as u64);
    }

    pub fn observe_unprepare(&self, ok: bool) {
        if ok {
            self.unprepared.inc()
        } else {
            self.unprepare_errors.inc()
        };
    }

    pub fn observe_status_write(&self, outcome: StatusWrite) {
        self.status_writes
            .get_or_create(&StatusWriteLabels {
                outcome: outcome.label(),
            })
            .inc();
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClaimGpuLabels {
    namespace: String,
    claim: String,
    claim_uid: String,
    gpu_uuid: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClaimLabels {
    namespace: String,
    claim: String,
    claim_uid: String,
}

/// Reads claim metrics at scrape time.
#[derive(Debug)]
struct ClaimCollector {
    state_dir: PathBuf,
}

type U64Gauge = Gauge<u64, AtomicU64>;
type RatioGauge = Gauge<f64, AtomicU64>;
type SecondsCounter = Counter<f64, AtomicU64>;

impl Collector for ClaimCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let checkpoint = match Checkpoint::load(&self.state_dir.join("checkpoint.json")) {
            Ok(checkpoint) => checkpoint,
            Err(error) => {
                tracing::warn!(%error, "metrics: cannot read the checkpoint");
                Checkpoint::default()
            }
        };
        let used: Family<ClaimGpuLabels, U64Gauge> = Family::default();
        let limit: Family<ClaimGpuLabels, U64Gauge> = Family::default();
        let spilled: Family<ClaimGpuLabels, U64Gauge> = Family::default();
        let cores: Family<ClaimGpuLabels, RatioGauge> = Family::default();
        let busy: Family<ClaimGpuLabels, SecondsCounter> = Family::default();
        let processes: Family<ClaimLabels, U64Gauge> = Family::default();
        let admin: Family<ClaimGpuLabels, U64Gauge> = Family::default();
        let mut prepared = 0u64;
        for (uid, claim) in checkpoint
            .claims
            .iter()
            .filter(|(_, c)| c.state == ClaimState::PrepareCompleted)
        {
            prepared += 1;
            // Admin access: no region, no wall, nothing charged; say so and nothing else.
            if !claim.devices.is_empty() && claim.devices.iter().all(|d| d.device.admin_access) {
                for gpu in &claim.gpus {
                    admin
                        .get_or_create(&ClaimGpuLabels {
                            namespace: claim.namespace.clone(),
                            claim: claim.name.clone(),
                            claim_uid: uid.clone(),
                            gpu_uuid: gpu.uuid.clone(),
                        })
                        .set(1);
                }
                continue;
            }
            let region = tessera_driver::cdi::HostPaths::new(&self.state_dir, uid).region;
            let usage = regions::read_usage(&region);
            if let Err(error) = &usage {
                tracing::debug!(claim_uid = %uid, %error, "metrics: region unreadable");
            }
            let claim_labels = ClaimLabels {
                namespace: claim.namespace.clone(),
                claim: claim.name.clone(),
                claim_uid: uid.clone(),
            };
            let (devices, live) = usage.unwrap_or_default();
            processes.get_or_create(&claim_labels).set(live as u64);
            for gpu in &claim.gpus {
                let labels = ClaimGpuLabels {
                    namespace: claim.namespace.clone(),
                    claim: claim.name.clone(),
                    claim_uid: uid.clone(),
                    gpu_uuid: gpu.uuid.clone(),
                };
                let usage = devices.iter().find(|d| d.uuid == gpu.uuid);
                used.get_or_create(&labels)
                    .set(usage.map_or(0, |d| d.memory_used));
                spilled
                    .get_or_create(&labels)
                    .set(usage.map_or(0, |d| d.memory_spilled));
                limit.get_or_create(&labels).set(gpu.memory_limit);
                // `cores` is out of 100 per GPU.
                cores
                    .get_or_create(&labels)
                    .set(f64::from(gpu.cores) / 100.0);
                busy.get_or_create(&labels)
                    .inc_by(usage.map_or(0, |d| d.gpu_busy_ns) as f64 / 1e9);
            }
        }
        let count: U64Gauge = Gauge::default();
        count.set(prepared);
        count.encode(encoder.encode_descriptor(
            "claims_prepared",
            "Claims prepared on this node",
            None,
            MetricType::Gauge,
        )?)?;
        let bytes = Unit::Bytes;
        let ratio = Unit::Other("ratio".into());
        used.encode(encoder.encode_descriptor(
            "claim_memory_used",
            "GPU memory held by the live processes of a claim",
            Some(&bytes),
            MetricType::Gauge,
        )?)?;
        limit.encode(encoder.encode_descriptor(
            "claim_memory_limit",
            "GPU memory limit of a claim",
            Some(&bytes),
            MetricType::Gauge,
        )?)?;
        spilled.encode(encoder.encode_descriptor(
            "claim_memory_spilled",
            "Memory of a claim's live processes served from host memory instead of the GPU (oversubscription)",
            Some(&bytes),
            MetricType::Gauge,
        )?)?;
        cores.encode(encoder.encode_descriptor(
            "claim_cores_limit",
            "Compute share of a claim on a GPU (1 = the whole GPU)",
            Some(&ratio),
            MetricType::Gauge,
        )?)?;
        busy.encode(encoder.encode_descriptor(
            "claim_gpu_busy",
            "GPU time the kernels of a claim have taken on a GPU, as its shim measured them (its rate is the claim's achieved share of the GPU)",
            Some(&Unit::Seconds),
            MetricType::Counter,
        )?)?;
        processes.encode(encoder.encode_descriptor(
            "claim_processes",
            "Live processes using a claim",
            None,
            MetricType::Gauge,
        )?)?;
        admin.encode(encoder.encode_descriptor(
            "claim_admin_access",
            "1 for each GPU of a claim allocated with admin access (no wall, nothing charged)",
            None,
            MetricType::Gauge,
        )?)?;
        Ok(())
    }
}
