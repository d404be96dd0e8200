//! The Grafana dashboard's queries are robust to duplicate series: during a rolling update two
//! plugin pods on one node export the same claim and GPU gauges (both read the node's shared
//! checkpoint and regions), and a standby controller exports the same GPU and claim gauges as
//! the leader. Every gauge query must show the same with such duplicates as with one scrape.
//!
//! Evaluated by promtool (Debian's Prometheus): for each query `E` and its copy `E1` over the
//! single scrape's series (renamed `single_…`), `promtool test rules` asserts that `E` is not
//! empty and that `E` and `E1` have the same series with the same values. Counter panels (rates
//! of `…_total` and `…_bucket`) are left out: each plugin instance counts its own calls, so
//! there summing the instances is right — except `tessera_claim_gpu_busy_seconds_total`, which
//! every instance reads from the claim's region, so duplicates say the same and must be shown
//! once.

mod common;

use std::path::Path;

use common::*;
use serde_json::{Value, json};

/// One series: metric name, labels, value.
type Series = (String, Vec<(&'static str, &'static str)>, f64);

/// The one counter the dashboard shows per claim: read from the claim's region by every plugin
/// instance alike.
const PER_CLAIM_COUNTER: &str = "tessera_claim_gpu_busy_seconds_total";

/// promtool's input values for a series: a gauge's constant value, or a counter growing at
/// `value` per second (one sample a minute).
fn values(metric: &str, value: f64) -> String {
    if metric.ends_with("_total") {
        format!("0+{}x5", value * 60.0)
    } else {
        format!("{value}x5")
    }
}

/// The single scrape of one node (`gpu-a`, two GPUs, two claims on GPU-1) and of the
/// controller, as the chart's monitors label them: (metric, labels, value).
fn single_scrape() -> Vec<Series> {
    let plugin = [
        ("node", "gpu-a"),
        ("pod", "plugin-old"),
        ("instance", "10.0.0.1:9477"),
        ("job", "tessera-system/tessera-kubelet-plugin"),
    ];
    let controller = [
        ("pod", "controller-leader"),
        ("instance", "10.0.0.5:8080"),
        ("job", "tessera-controller"),
    ];
    let with = |base: &[(&'static str, &'static str)], more: &[(&'static str, &'static str)]| {
        base.iter().chain(more).copied().collect::<Vec<_>>()
    };
    let mut series = Vec::new();
    for (gpu, product, capacity, physical, allocated, cores, shares) in [
        ("GPU-0", "NVIDIA L40S", 96e9, 48e9, 10e9, 0.5, 2.0),
        ("GPU-1", "NVIDIA L40S", 48e9, 48e9, 6e9, 0.45, 2.0),
    ] {
        let gpu_labels = [("node", "gpu-a"), ("gpu_uuid", gpu), ("product", product)];
        for (metric, value) in [
            ("tessera_gpu_memory_capacity_bytes", capacity),
            ("tessera_gpu_memory_allocated_bytes", allocated),
            ("tessera_gpu_cores_allocated_ratio", cores),
            ("tessera_gpu_shares_allocated", shares),
        ] {
            series.push((metric.to_string(), with(&controller, &gpu_labels), value));
        }
        series.push((
            "tessera_gpu_memory_physical_bytes".into(),
            with(&plugin, &[("gpu_uuid", gpu), ("product", product)]),
            physical,
        ));
    }
    for (claim, uid, pod, used, limit, cores, processes, busy) in [
        ("train-gpu-x1", "u1", "train", 3.5e9, 4e9, 0.25, 2.0, 0.4),
        ("infer-gpu-x2", "u2", "infer", 1e9, 2e9, 0.2, 1.0, 0.05),
    ] {
        let claim_labels = [
            ("namespace", "team-a"),
            ("claim", claim),
            ("claim_uid", uid),
        ];
        let on_gpu = with(&claim_labels, &[("gpu_uuid", "GPU-1")]);
        for (metric, value) in [
            ("tessera_claim_memory_used_bytes", used),
            ("tessera_claim_memory_limit_bytes", limit),
            ("tessera_claim_cores_limit_ratio", cores),
            // A counter: its rate, in GPU seconds per second.
            (PER_CLAIM_COUNTER, busy),
        ] {
            series.push((metric.to_string(), with(&plugin, &on_gpu), value));
        }
        series.push((
            "tessera_claim_processes".into(),
            with(&plugin, &claim_labels),
            processes,
        ));
        // The controller's own `pod` label (the workload's) wins over the target's.
        series.push((
            "tessera_claim_pod_info".into(),
            vec![
                ("namespace", "team-a"),
                ("claim", claim),
                ("pod", pod),
                ("instance", "10.0.0.5:8080"),
                ("job", "tessera-controller"),
            ],
            1.0,
        ));
    }
    series.push(("tessera_claims_prepared".into(), plugin.to_vec(), 2.0));
    series.push((
        "tessera_controller_reconcile_duration_seconds".into(),
        controller.to_vec(),
        0.02,
    ));
    series
}

/// The same scrape with a second plugin pod on the node and a standby controller.
fn with_duplicates(single: &[Series]) -> Vec<Series> {
    let mut all = single.to_vec();
    for (metric, labels, value) in single {
        let second: Vec<(&'static str, &'static str)> = labels
            .iter()
            .map(|&(k, v)| match (k, v) {
                ("pod", "plugin-old") => ("pod", "plugin-new"),
                ("pod", "controller-leader") => ("pod", "controller-standby"),
                ("instance", "10.0.0.1:9477") => ("instance", "10.0.0.2:9477"),
                ("instance", "10.0.0.5:8080") => ("instance", "10.0.0.6:8080"),
                other => other,
            })
            .collect();
        all.push((metric.clone(), second, *value));
    }
    all
}

fn series_text(metric: &str, labels: &[(&str, &str)]) -> String {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{metric}{{{}}}", labels.join(","))
}

/// Every query of the dashboard, with its variables set to "All".
fn dashboard_queries() -> Vec<String> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../charts/tessera/files/dashboard.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard.json"))
            .expect("the dashboard is JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                queries.push(expr.replace("$node", ".*").replace("$namespace", ".*"));
            }
        }
    }
    queries
}

#[test]
fn every_gauge_query_shows_the_same_with_duplicate_scrapes() {
    let test = "every_gauge_query_shows_the_same_with_duplicate_scrapes";
    let Some(_helm) = helm_or_skip(test) else {
        return;
    };
    let Some(promtool) = tessera_e2e_harness::promtool::require(test) else {
        return;
    };
    let queries: Vec<String> = dashboard_queries()
        .into_iter()
        .filter(|q| {
            !q.contains("_bucket") && (!q.contains("_total") || q.contains(PER_CLAIM_COUNTER))
        })
        .collect();
    assert!(queries.len() >= 17, "{queries:?}");
    assert!(
        queries.iter().any(|q| q.contains(PER_CLAIM_COUNTER)),
        "the achieved-share panel: {queries:?}"
    );
    let single = single_scrape();
    let mut input = Vec::new();
    for (metric, labels, value) in with_duplicates(&single) {
        input.push(
            json!({ "series": series_text(&metric, &labels), "values": values(&metric, value) }),
        );
    }
    for (metric, labels, value) in &single {
        input.push(json!({
            "series": series_text(&format!("single_{metric}"), labels),
            "values": values(metric, *value),
        }));
    }
    let mut cases = Vec::new();
    for query in &queries {
        for metric in single.iter().map(|(m, ..)| m.as_str()) {
            assert!(
                !query.contains(&format!("single_{metric}")),
                "{query} already names single_ series"
            );
        }
        let once = single
            .iter()
            .map(|(m, ..)| m.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .fold(query.clone(), |q, metric| {
                q.replace(metric, &format!("single_{metric}"))
            });
        for expr in [
            format!("absent({query})"),
            format!("({query}) != ({once})"),
            format!("({query}) unless ({once})"),
            format!("({once}) unless ({query})"),
        ] {
            cases.push(json!({ "expr": expr, "eval_time": "2m", "exp_samples": [] }));
        }
    }
    let tests = json!({
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [{ "interval": "1m", "input_series": input, "promql_expr_test": cases }],
    });
    let dir = tempfile::Builder::new()
        .prefix("tessera-dashboard-")
        .tempdir()
        .expect("tempdir");
    std::fs::write(
        dir.path().join("dashboard-test.yaml"),
        serde_yaml::to_string(&tests).expect("YAML"),
    )
    .expect("writing the test");
    if let Err(output) = tessera_e2e_harness::promtool::run(
        &promtool,
        dir.path(),
        &["test", "rules", "dashboard-test.yaml"],
    ) {
        panic!("a dashboard query changes with duplicate series:\n{output}");
    }
}
