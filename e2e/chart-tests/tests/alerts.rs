//! The chart's alert rules (a PrometheusRule) evaluated by Prometheus' own tool: rendered by the
//! pinned helm, checked with `promtool check rules`, and unit-tested with `promtool test rules`
//! on the series the plugin and the controller export (`fixtures/alerts-test.yaml`), promtool
//! from Debian's Prometheus (`e2e/scripts/install-promtool.sh`).

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::*;
use serde_json::{Value, json};
use tessera_chart_tests::Capabilities;

fn with_monitoring() -> Capabilities {
    Capabilities::offline(
        "v1.37.1",
        &[
            "monitoring.coreos.com/v1",
            "monitoring.coreos.com/v1/PrometheusRule",
        ],
    )
}

/// The alert rules of the rendered PrometheusRule, by name.
fn alerts(rule: &Value) -> Vec<&Value> {
    rule["spec"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter(|r| r["alert"].is_string())
        .collect()
}

/// The unit tests, with each expected alert's static `description` taken from its rule.
fn tests_with_descriptions(rule: &Value) -> Value {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/alerts-test.yaml"),
    )
    .expect("fixtures/alerts-test.yaml");
    let mut tests: Value = serde_yaml::from_str(&text).expect("alerts-test.yaml is YAML");
    let rules = alerts(rule);
    for test in tests["tests"].as_array_mut().expect("tests") {
        for case in test["alert_rule_test"].as_array_mut().expect("cases") {
            let name = case["alertname"].as_str().expect("alertname").to_owned();
            let description = rules
                .iter()
                .find(|r| r["alert"] == name.as_str())
                .map(|r| r["annotations"]["description"].clone())
                .unwrap_or_else(|| {
                    panic!("the tests name {name}, which the chart has no rule for")
                });
            for alert in case["exp_alerts"].as_array_mut().expect("exp_alerts") {
                alert["exp_annotations"]["description"] = description.clone();
            }
        }
    }
    tests
}

#[test]
fn every_alert_fires_when_it_should_and_only_once() {
    let test = "every_alert_fires_when_it_should_and_only_once";
    let Some(helm) = helm_or_skip(test) else {
        return;
    };
    let Some(promtool_path) = tessera_e2e_harness::promtool::require(test) else {
        return;
    };
    let objects = render(&helm, "", &with_monitoring());
    let rule = find(&objects, "PrometheusRule", RELEASE);
    let names: BTreeSet<&str> = alerts(rule)
        .iter()
        .filter_map(|r| r["alert"].as_str())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "TesseraClaimAtMemoryWall",
            "TesseraClaimSpillNearLimit",
            "TesseraClaimsFailingToPrepare",
            "TesseraGpuUnhealthy",
            "TesseraPluginDown",
            "TesseraPluginUnavailable",
        ])
    );
    for alert in alerts(rule) {
        let description = alert["annotations"]["description"].as_str().unwrap_or("");
        assert!(
            !description.contains("{{"),
            "{}: the description is static text (the tests compare it verbatim)",
            alert["alert"]
        );
    }

    let dir = tempfile::Builder::new()
        .prefix("tessera-alerts-")
        .tempdir()
        .expect("tempdir");
    let rules = json!({ "groups": rule["spec"]["groups"] });
    std::fs::write(
        dir.path().join("rules.yaml"),
        serde_yaml::to_string(&rules).expect("rules as YAML"),
    )
    .expect("writing rules.yaml");
    tessera_e2e_harness::promtool::run(
        &promtool_path,
        dir.path(),
        &["check", "rules", "rules.yaml"],
    )
    .unwrap_or_else(|e| panic!("promtool check rules:\n{e}"));

    let tests = tests_with_descriptions(rule);
    let tested: BTreeSet<&str> = tests["tests"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|t| t["alert_rule_test"].as_array().into_iter().flatten())
        .filter(|c| c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()))
        .filter_map(|c| c["alertname"].as_str())
        .collect();
    assert_eq!(tested, names, "every alert is shown firing by a test");
    std::fs::write(
        dir.path().join("tests.yaml"),
        serde_yaml::to_string(&tests).expect("tests as YAML"),
    )
    .expect("writing tests.yaml");
    tessera_e2e_harness::promtool::run(
        &promtool_path,
        dir.path(),
        &["test", "rules", "tests.yaml"],
    )
    .unwrap_or_else(|e| panic!("promtool test rules:\n{e}"));
}

#[test]
fn alerts_follow_the_monitoring_values() {
    let test = "alerts_follow_the_monitoring_values";
    let Some(helm) = helm_or_skip(test) else {
        return;
    };
    let has_rule = |objects: &[Value]| objects.iter().any(|o| o["kind"] == "PrometheusRule");
    // Offline without the prometheus-operator API: no rule (`monitoring.enabled: auto`).
    assert!(!has_rule(&render(
        &helm,
        "",
        &Capabilities::offline("v1.37.1", &[])
    )));
    assert!(!has_rule(&render(
        &helm,
        "monitoring: {alerts: {enabled: false}}\n",
        &with_monitoring()
    )));
    // Thresholds and durations are the values given, with the release's own plugin job.
    let objects = render(
        &helm,
        "monitoring:\n  labels: {release: kps}\n  alerts:\n    memoryWallRatio: 0.9\n    for: {gpuUnhealthy: 5m}\n",
        &with_monitoring(),
    );
    let rule = find(&objects, "PrometheusRule", RELEASE);
    assert_eq!(rule["metadata"]["labels"]["release"], "kps");
    let by_name = |name: &str| {
        alerts(rule)
            .into_iter()
            .find(|r| r["alert"] == name)
            .unwrap_or_else(|| panic!("{name}"))
            .clone()
    };
    assert_eq!(by_name("TesseraGpuUnhealthy")["for"], "5m");
    assert!(
        by_name("TesseraClaimAtMemoryWall")["expr"]
            .as_str()
            .is_some_and(|e| e.ends_with(">= 0.9")),
        "{}",
        by_name("TesseraClaimAtMemoryWall")
    );
    assert!(
        by_name("TesseraPluginDown")["expr"]
            .as_str()
            .is_some_and(|e| e.contains(&format!(r#"job="{NAMESPACE}/{PLUGIN}""#))),
        "{}",
        by_name("TesseraPluginDown")
    );
    // A misspelt duration is refused by the schema, naming it.
    let refused = helm
        .render(
            &tessera_chart_tests::Release::new(RELEASE, NAMESPACE)
                .values("monitoring: {alerts: {for: {pluginDown: 5 minutes}}}\n"),
            &with_monitoring(),
        )
        .expect_err("a duration Prometheus does not read");
    assert!(
        refused.to_string().contains("pluginDown"),
        "the error names the value: {refused}"
    );
}
