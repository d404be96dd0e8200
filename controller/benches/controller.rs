//! Whole-process timings (no criterion: the numbers go to docs/benchmarks.md):
//! 1. building and rendering a node's slices for 8 GPUs, every mode and version;
//! 2. publishing them to the real v1.37 kube-apiserver (first sync, and the no-op re-sync),
//!    when the e2e binaries are built;
//! 3. the cluster controller's reconcile computation over 1,000 nodes × 8 GPUs of slices and
//!    5,000 allocated claims (view, metrics update, desired DeviceClasses), with memory.
//!
//! `cargo bench -p tessera-controller --bench controller`

use std::hint::black_box;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tessera_controller::cluster::metrics::ClusterMetrics;
use tessera_controller::cluster::{build_view, desired_classes};
use tessera_controller::slices::{CounterLayout, SliceMeta, build_pool, render_pool};
use tessera_controller::{ApiVersion, SharingMode};
use tessera_driver::{Gpu, Inventory};

fn inventory(node: usize, gpus: u32) -> Inventory {
    let models = [
        "NVIDIA GeForce RTX 4090",
        "NVIDIA L40S",
        "NVIDIA H100 80GB HBM3",
        "NVIDIA A100-SXM4-40GB",
    ];
    Inventory {
        driver_version: Some("570.86.15".into()),
        gpus: (0..gpus)
            .map(|i| Gpu {
                uuid: format!("GPU-{node:08x}-{i:04x}-4000-8000-000000000000"),
                index: i,
                minor: i,
                product_name: models[node % models.len()].into(),
                memory: 48 << 30,
                brand: Some("nvidia".into()),
                architecture: Some("ada".into()),
                cuda_compute_capability: Some("8.9".into()),
                pci_bus_id: Some(format!("0000:{:02x}:00.0", i + 1)),
                pcie_root: None,
                numa_node: None,
                context_overhead: 0,
                driver_memory_wall: false,
            })
            .collect(),
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn time<T>(iterations: u32, mut f: impl FnMut() -> T) -> Duration {
    let start = Instant::now();
    for _ in 0..iterations {
        black_box(f());
    }
    start.elapsed() / iterations
}

fn build_and_render() {
    let inv = inventory(0, 8);
    println!("## build + render, 8 GPUs (mean of 2000)");
    for mode in [
        SharingMode::Consumable,
        SharingMode::Partitioned,
        SharingMode::Fixed { slices: 4 },
        SharingMode::Exclusive,
    ] {
        for version in ApiVersion::ALL.into_iter().filter(|v| v.supports(mode)) {
            let t = time(2000, || {
                let plan = build_pool(&inv, "node-0", mode, CounterLayout::Separate).expect("plan");
                render_pool(
                    &plan,
                    version,
                    &SliceMeta {
                        generation: 1,
                        node_uid: Some("uid"),
                    },
                )
            });
            println!(
                "{:<12} {:<9} {:>8.1} µs",
                mode.name(),
                version.version(),
                t.as_secs_f64() * 1e6
            );
        }
    }
}

fn cluster_objects(nodes: usize, claims: usize) -> (Vec<Value>, Vec<Value>) {
    let mut slices = Vec::new();
    for n in 0..nodes {
        let node = format!("node-{n:04}");
        let plan = build_pool(
            &inventory(n, 8),
            &node,
            SharingMode::Consumable,
            CounterLayout::Separate,
        )
        .expect("plan");
        slices.extend(render_pool(
            &plan,
            ApiVersion::V1,
            &SliceMeta {
                generation: 1,
                node_uid: Some("uid"),
            },
        ));
    }
    let claims = (0..claims)
        .map(|c| {
            let node = format!("node-{:04}", c % nodes);
            json!({"metadata": {"namespace": format!("ns-{}", c % 50), "name": format!("claim-{c}")},
                   "status": {"allocation": {"devices": {"results": [{"request": "gpu", "driver": "gpu.tessera.dev", "pool": node,
                       "device": format!("gpu-{}", (c / nodes) % 8), "shareID": "a671734a-e8e5-11e4-8fde-42010af09327",
                       "consumedCapacity": {"memory": "4Gi", "cores": "10"}}]}}}})
        })
        .collect();
    (slices, claims)
}

fn cluster_reconcile() {
    let before = rss_kib();
    let (slices, claims) = cluster_objects(1000, 5000);
    let with_objects = rss_kib();
    let metrics = ClusterMetrics::default();
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let mut view = build_view(&slices, &claims);
    let t_view = time(10, || build_view(&slices, &claims));
    let t_metrics = time(10, || metrics.update(&view));
    let t_classes = time(10, || desired_classes(&view.products, ApiVersion::V1));
    let mut text = String::new();
    let start = Instant::now();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    let t_encode = start.elapsed();
    let after = rss_kib();
    view.claims.truncate(0);
    println!(
        "## cluster reconcile: 1000 nodes × 8 GPUs ({} slices, {} GPUs), 5000 claims (mean of 10)",
        slices.len(),
        view.gpus.len()
    );
    println!("build_view       {:>8.1} ms", t_view.as_secs_f64() * 1e3);
    println!("metrics.update   {:>8.1} ms", t_metrics.as_secs_f64() * 1e3);
    println!("desired_classes  {:>8.3} ms", t_classes.as_secs_f64() * 1e3);
    println!(
        "/metrics encode  {:>8.1} ms ({} KiB of text)",
        t_encode.as_secs_f64() * 1e3,
        text.len() / 1024
    );
    println!(
        "RSS: {} MiB at start, {} MiB with the objects as JSON, {} MiB with view + metrics",
        before / 1024,
        with_objects / 1024,
        after / 1024
    );
}

async fn publish_real() {
    use tessera_e2e_harness::binaries::Binaries;
    use tessera_e2e_harness::versions::K8sVersion;
    let version = K8sVersion::newest();
    let Ok(binaries) = Binaries::locate(version) else {
        println!(
            "## publish to a real kube-apiserver: SKIPPED (e2e/scripts/build-k8s.sh e2e/k8s/v1.37 first)"
        );
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut options = tessera_e2e_harness::ControlPlaneOptions::new(version, dir.path());
    options.binaries = Some(binaries);
    let cp = tessera_e2e_harness::ControlPlane::start(options)
        .await
        .expect("control plane");
    let inv = inventory(0, 8);
    println!("## publish 8 GPUs to the real kube-apiserver v1.37 on loopback (mean of 20 nodes)");
    for mode in [
        SharingMode::Consumable,
        SharingMode::Partitioned,
        SharingMode::Fixed { slices: 4 },
        SharingMode::Exclusive,
    ] {
        let (mut first, mut again) = (Duration::ZERO, Duration::ZERO);
        for n in 0..20 {
            let node = format!("bench-{}-{n}", mode.name());
            let publisher =
                tessera_controller::publish::Publisher::new(cp.client(), &node, ApiVersion::V1);
            let plan = build_pool(&inv, &node, mode, CounterLayout::Separate).expect("plan");
            let t = Instant::now();
            publisher.sync(&plan).await.expect("sync");
            first += t.elapsed();
            let t = Instant::now();
            let r = publisher.sync(&plan).await.expect("sync");
            again += t.elapsed();
            assert!(!r.changed());
        }
        println!(
            "{:<12} first sync {:>6.1} ms, no-op re-sync {:>6.1} ms",
            mode.name(),
            first.as_secs_f64() * 50.0,
            again.as_secs_f64() * 50.0
        );
    }
    cp.stop();
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    build_and_render();
    cluster_reconcile();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(publish_real());
}
