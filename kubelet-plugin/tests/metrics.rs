//! `/metrics` and `/healthz`: claim limits from the checkpoint, memory in use from the regions,
//! counting only slots whose owner still holds its lock; OpenMetrics to scrapers that ask for
//! it, the classic text format (which promtool accepts) to the others.

mod support;

use http_body_util::BodyExt;
use support::*;
use tessera_driver::health::{NodeGpus, TAINT_UNHEALTHY, Taint, TaintEffect, Unhealthy};
use tower::ServiceExt;

const UID: &str = "0b7c4a2e-8c1d-4f53-9f0e-3b1f6f1c2a77";

async fn get(router: axum::Router, path: &str) -> (u16, String) {
    let (status, _, body) = get_accepting(router, path, None).await;
    (status, body)
}

/// Status, content type and body of `path`, with `accept` as the `Accept` header.
async fn get_accepting(
    router: axum::Router,
    path: &str,
    accept: Option<&str>,
) -> (u16, String, String) {
    let mut request = http::Request::get(path);
    if let Some(accept) = accept {
        request = request.header(http::header::ACCEPT, accept);
    }
    let response = router
        .oneshot(request.body(axum::body::Body::empty()).expect("request"))
        .await
        .expect("response");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (
        status,
        content_type,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// The plugin, started, with claim team-a/train prepared: 8 GiB and half the cores of GPU 0.
async fn started_with_train_prepared(env: &Env) -> Instance {
    let instance = env.start(None, None).await;
    env.api.put(claim(
        "team-a",
        "train",
        UID,
        Some(vec![share(
            "gpu",
            "gpu-0",
            "9f0c4c4e-1111-4000-8000-000000000001",
            "8Gi",
            "50",
        )]),
        vec![],
    ));
    instance
        .kubelet
        .prepare_ok(Version::V1, &Claim::new("team-a", "train", UID))
        .await;
    instance
}

#[tokio::test]
async fn metrics_count_only_live_processes() {
    let env = Env::new(&["v1"]);
    let instance = started_with_train_prepared(&env).await;

    // Two processes charged the region: slot 0's owner is alive (holds its lock), slot 1's died.
    let path = env.claim_dir(UID).join("region");
    let owner = charge_region(&path, &[(0, 3 * GIB, 0), (1, 5 * GIB, 0)]);
    // The claim's kernels have taken 2.5 s of GPU 0 (the first device's `compute_busy_ns`).
    let mut bytes = std::fs::read(&path).expect("region");
    bytes[64 + 96..64 + 104].copy_from_slice(&2_500_000_000u64.to_le_bytes());
    std::fs::write(&path, &bytes).expect("busy time");

    let router = tessera_kubelet_plugin::http::router(instance.metrics.clone());
    let (status, text) = get(router.clone(), "/metrics").await;
    assert_eq!(status, 200);
    let labels =
        format!("namespace=\"team-a\",claim=\"train\",claim_uid=\"{UID}\",gpu_uuid=\"{GPU0}\"");
    for line in [
        format!("tessera_claim_memory_used_bytes{{{labels}}} {}", 3 * GIB),
        format!("tessera_claim_memory_limit_bytes{{{labels}}} {}", 8 * GIB),
        format!("tessera_claim_cores_limit_ratio{{{labels}}} 0.5"),
        format!("tessera_claim_gpu_busy_seconds_total{{{labels}}} 2.5"),
        format!(
            "tessera_claim_processes{{namespace=\"team-a\",claim=\"train\",claim_uid=\"{UID}\"}} 1"
        ),
        "tessera_claims_prepared 1".to_string(),
        "tessera_prepared_claims_total 1".to_string(),
        "tessera_prepare_duration_seconds_count 1".to_string(),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }
    drop(owner);
    // A process another test of this binary forks at that moment shares the lock's open file
    // description until it execs: the death shows once that child has exec'd (milliseconds).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let (_, text) = get(router.clone(), "/metrics").await;
        if text.contains(&format!("tessera_claim_memory_used_bytes{{{labels}}} 0")) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the owner died: {text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(get(router, "/healthz").await, (200, "ok\n".to_string()));
    instance.stop().await;
}

/// Prometheus asks for OpenMetrics and gets it; promtool, older agents and `curl` get the
/// classic text format, with HELP and TYPE for every family, which `promtool check metrics`
/// accepts without a problem.
#[tokio::test]
async fn openmetrics_for_prometheus_and_classic_text_that_promtool_accepts_for_the_rest() {
    let test = "openmetrics_for_prometheus_and_classic_text_that_promtool_accepts_for_the_rest";
    let Some(promtool) = tessera_e2e_harness::promtool::require(test) else {
        return;
    };
    let env = Env::new(&["v1"]);
    let instance = started_with_train_prepared(&env).await;
    let owner = charge_region(&env.claim_dir(UID).join("region"), &[(0, 3 * GIB, 0)]);
    instance
        .metrics
        .observe_gpu_health(&NodeGpus::from(env.inventory.clone()));
    instance.metrics.observe_inventory(&env.inventory);
    let router = tessera_kubelet_plugin::http::router(instance.metrics.clone());

    let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let (status, content_type, text) =
        get_accepting(router.clone(), "/metrics", Some(prometheus)).await;
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert!(
        text.contains("# TYPE tessera_prepared_claims counter"),
        "{text}"
    );

    for accept in [None, Some("text/plain;version=0.0.4"), Some("*/*")] {
        let (status, content_type, text) = get_accepting(router.clone(), "/metrics", accept).await;
        assert_eq!(status, 200);
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{accept:?}: {content_type}"
        );
        assert!(!text.contains("# EOF"), "{text}");
        assert!(
            text.contains(
                "# TYPE tessera_prepared_claims_total counter\ntessera_prepared_claims_total 1\n"
            ),
            "{accept:?}: the counter named as its samples are:\n{text}"
        );
        tessera_e2e_harness::promtool::check_metrics(&promtool, &text)
            .unwrap_or_else(|e| panic!("{accept:?}: {e}\n{text}"));
    }
    drop(owner);
    instance.stop().await;
}

/// `tessera_gpu_healthy` follows the health watcher: 1 for each healthy GPU, 0 while one is
/// held unhealthy, 1 again once it is back.
#[test]
fn each_gpu_says_whether_it_is_healthy() {
    let env = Env::new(&["v1"]);
    let metrics = tessera_kubelet_plugin::metrics::Metrics::new(env.path("state"));
    // Sorted: a family's series come in no fixed order.
    let series = |metrics: &tessera_kubelet_plugin::metrics::Metrics| -> Vec<String> {
        let mut lines: Vec<String> = metrics
            .encode()
            .expect("metrics")
            .lines()
            .filter(|l| l.starts_with("tessera_gpu_healthy{"))
            .map(String::from)
            .collect();
        lines.sort();
        lines
    };
    let healthy = NodeGpus::from(env.inventory.clone());
    metrics.observe_gpu_health(&healthy);
    let both = [
        format!(r#"tessera_gpu_healthy{{gpu_uuid="{GPU1}",product="NVIDIA L40S"}} 1"#),
        format!(r#"tessera_gpu_healthy{{gpu_uuid="{GPU0}",product="NVIDIA GeForce RTX 4090"}} 1"#),
    ];
    assert_eq!(series(&metrics), both);
    let mut one_down = healthy.clone();
    one_down.unhealthy.insert(
        GPU1.into(),
        Unhealthy {
            reason: "NVML cannot reach it".into(),
            taint: Taint {
                key: TAINT_UNHEALTHY,
                value: String::new(),
                effect: TaintEffect::NoSchedule,
            },
        },
    );
    metrics.observe_gpu_health(&one_down);
    assert_eq!(
        series(&metrics),
        [
            format!(r#"tessera_gpu_healthy{{gpu_uuid="{GPU1}",product="NVIDIA L40S"}} 0"#),
            both[1].clone(),
        ]
    );
    metrics.observe_gpu_health(&healthy);
    assert_eq!(series(&metrics), both);
}

/// `tessera_gpu_memory_physical_bytes`: each GPU's own memory, to set beside the capacity the
/// slices offer (more where the node overcommits it).
#[test]
fn each_gpu_says_its_physical_memory() {
    let env = Env::new(&["v1"]);
    let metrics = tessera_kubelet_plugin::metrics::Metrics::new(env.path("state"));
    metrics.observe_inventory(&env.inventory);
    let text = metrics.encode().expect("metrics");
    for (uuid, product, bytes) in [
        (GPU0, "NVIDIA GeForce RTX 4090", 24 * GIB),
        (GPU1, "NVIDIA L40S", 48 * GIB),
    ] {
        let line = format!(
            r#"tessera_gpu_memory_physical_bytes{{gpu_uuid="{uuid}",product="{product}"}} {bytes}"#
        );
        assert!(text.contains(&line), "{line} in:\n{text}");
    }
}

/// Refusals are counted by reason beside the errors they are part of, and a call whose every
/// claim was refused is not timed: `tessera_prepare_duration_seconds` is the latency of
/// preparing. A claim asking for high priority without the grant is refused twice (two kubelet
/// retries: two errors, two refusals); a claim naming a GPU config field that does not exist is
/// invalid; a good claim is prepared and timed.
#[tokio::test]
async fn refusals_are_counted_by_reason_and_not_timed() {
    let env = Env::new(&["v1"]);
    let instance = env.start(None, None).await;
    let put = |name: &str, uid: &str, fields: serde_json::Value| {
        env.api.put(claim(
            "team-a",
            name,
            uid,
            Some(vec![result("gpu", "gpu-0")]),
            vec![config_entry("FromClaim", &["gpu"], fields)],
        ));
    };
    let promoted = "0b7c4a2e-8c1d-4f53-9f0e-3b1f6f1c2a01";
    let invalid = "0b7c4a2e-8c1d-4f53-9f0e-3b1f6f1c2a02";
    let good = "0b7c4a2e-8c1d-4f53-9f0e-3b1f6f1c2a03";
    put(
        "promoted",
        promoted,
        serde_json::json!({"priority": "high"}),
    );
    put(
        "invalid",
        invalid,
        serde_json::json!({"corePolicy": "soft"}),
    );
    put("good", good, serde_json::json!({"priority": "low"}));
    let series = |text: &str, name: &str| -> Option<String> {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .map(String::from)
    };
    for _ in 0..2 {
        let answer = instance
            .kubelet
            .prepare(Version::V1, &[Claim::new("team-a", "promoted", promoted)])
            .await
            .expect("call");
        assert!(!answer[promoted].error.is_empty());
    }
    let answer = instance
        .kubelet
        .prepare(Version::V1, &[Claim::new("team-a", "invalid", invalid)])
        .await
        .expect("call");
    assert!(answer[invalid].error.contains("corePolicy"), "{answer:?}");
    let text = instance.metrics.encode().expect("metrics");
    assert_eq!(
        series(
            &text,
            r#"tessera_prepare_refusals_total{reason="priority"}"#
        )
        .as_deref(),
        Some("2"),
        "{text}"
    );
    assert_eq!(
        series(&text, r#"tessera_prepare_refusals_total{reason="invalid"}"#).as_deref(),
        Some("1"),
        "{text}"
    );
    assert_eq!(
        series(&text, "tessera_prepare_errors_total").as_deref(),
        Some("3"),
        "{text}"
    );
    assert_eq!(
        series(&text, "tessera_prepare_duration_seconds_count").as_deref(),
        Some("0"),
        "refusals are not timed: {text}"
    );
    instance
        .kubelet
        .prepare_ok(Version::V1, &Claim::new("team-a", "good", good))
        .await;
    let text = instance.metrics.encode().expect("metrics");
    assert_eq!(
        series(&text, "tessera_prepare_duration_seconds_count").as_deref(),
        Some("1"),
        "{text}"
    );
    instance.stop().await;
}
