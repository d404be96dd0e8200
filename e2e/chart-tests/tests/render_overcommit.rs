//! `helm template` with `kubeletPlugin.memoryOvercommit` (docs/oversubscription.md): the factor,
//! global and per GPU model, reaches the plugin as `--memory-overcommit`; the default adds no
//! flag; factors outside 1–4 and model names the flag cannot carry are refused.
//! `kubeletPlugin.oversubscribeByDefault: true` adds `--oversubscribe-by-default`; anything but a
//! bool is refused.

mod common;

use common::*;
use tessera_chart_tests::Capabilities;

fn newest() -> Capabilities {
    Capabilities::offline("v1.37.1", &[])
}

fn plugin_args(helm: &tessera_chart_tests::Helm, values: &str, flag: &str) -> Vec<String> {
    let objects = render(helm, values, &newest());
    let ds = find(&objects, "DaemonSet", PLUGIN);
    args(&ds["spec"]["template"]["spec"]["containers"][0])
        .into_iter()
        .filter(|a| a.starts_with(flag))
        .collect()
}

fn overcommit_args(helm: &tessera_chart_tests::Helm, values: &str) -> Vec<String> {
    plugin_args(helm, values, "--memory-overcommit")
}

#[test]
fn the_spill_policy_reaches_the_plugin_only_when_true() {
    let Some(helm) = helm_or_skip("the_spill_policy_reaches_the_plugin_only_when_true") else {
        return;
    };
    let flag = "--oversubscribe-by-default";
    assert!(plugin_args(&helm, "", flag).is_empty(), "off by default");
    assert!(
        plugin_args(
            &helm,
            "kubeletPlugin: {oversubscribeByDefault: false}\n",
            flag
        )
        .is_empty(),
        "false adds nothing"
    );
    let on = "kubeletPlugin: {oversubscribeByDefault: true, memoryOvercommit: {factor: 1.5}}\n";
    assert_eq!(plugin_args(&helm, on, flag), vec![flag]);
    assert_eq!(
        overcommit_args(&helm, on),
        vec!["--memory-overcommit=default=1.5"],
        "the factor is still passed beside it"
    );
    let err = helm
        .render(
            &tessera_chart_tests::Release::new(RELEASE, NAMESPACE)
                .values("kubeletPlugin: {oversubscribeByDefault: \"yes\"}\n"),
            &newest(),
        )
        .expect_err("a string is refused");
    // values.schema.json answers first, naming the value and the type it wants.
    assert!(
        err.to_string()
            .contains("at '/kubeletPlugin/oversubscribeByDefault': got string, want boolean"),
        "{err}"
    );
}

#[test]
fn the_factor_reaches_the_plugin() {
    let Some(helm) = helm_or_skip("the_factor_reaches_the_plugin") else {
        return;
    };
    assert!(overcommit_args(&helm, "").is_empty(), "off by default");
    assert!(
        overcommit_args(&helm, "kubeletPlugin: {memoryOvercommit: {factor: 1}}\n").is_empty(),
        "factor 1 is off"
    );
    assert_eq!(
        overcommit_args(&helm, "kubeletPlugin: {memoryOvercommit: {factor: 1.5}}\n"),
        vec!["--memory-overcommit=default=1.5"]
    );
    let per_model = r#"
kubeletPlugin:
  memoryOvercommit:
    factor: 1.2
    byModel: {"NVIDIA L40S": 2, "Tesla T4": 1}
"#;
    assert_eq!(
        overcommit_args(&helm, per_model),
        vec!["--memory-overcommit=NVIDIA L40S=2,Tesla T4=1,default=1.2"]
    );
    // A model alone turns it on; the default stays 1.
    assert_eq!(
        overcommit_args(
            &helm,
            "kubeletPlugin: {memoryOvercommit: {byModel: {\"NVIDIA L40S\": 3}}}\n"
        ),
        vec!["--memory-overcommit=NVIDIA L40S=3,default=1"]
    );
}

#[test]
fn bad_factors_are_refused_with_the_reason() {
    let Some(helm) = helm_or_skip("bad_factors_are_refused_with_the_reason") else {
        return;
    };
    for (values, reason) in [
        (
            "kubeletPlugin: {memoryOvercommit: {factor: 5}}\n",
            "memoryOvercommit.factor must be a number from 1 to 4, not 5",
        ),
        (
            "kubeletPlugin: {memoryOvercommit: {factor: 0.5}}\n",
            "memoryOvercommit.factor must be a number from 1 to 4",
        ),
        (
            "kubeletPlugin: {memoryOvercommit: {factor: lots}}\n",
            "memoryOvercommit.factor must be a number from 1 to 4",
        ),
        (
            "kubeletPlugin: {memoryOvercommit: {byModel: {\"NVIDIA L40S\": 9}}}\n",
            "byModel[\"NVIDIA L40S\"] must be a number from 1 to 4",
        ),
        (
            "kubeletPlugin: {memoryOvercommit: {byModel: {\"a=b\": 2}}}\n",
            "may not contain , or =",
        ),
    ] {
        match helm.render(
            &tessera_chart_tests::Release::new(RELEASE, NAMESPACE).values(values),
            &newest(),
        ) {
            Ok(_) => panic!("{values:?} was accepted"),
            Err(e) => assert!(e.to_string().contains(reason), "{values:?}: {e}"),
        }
    }
}
