//! Gating like the e2e harness: with `TESSERA_E2E` unset a test whose tools are not built prints
//! `SKIP …`; `TESSERA_E2E=0` skips; any other value makes a missing tool a failure.

#![allow(dead_code)]

use serde_json::Value;
use tessera_chart_tests::{Capabilities, Helm, Release};

pub const NAMESPACE: &str = "tessera-system";
pub const RELEASE: &str = "tessera";
pub const PLUGIN: &str = "tessera-kubelet-plugin";
pub const CONTROLLER: &str = "tessera-controller";

pub fn helm_or_skip(test: &str) -> Option<Helm> {
    let located = Helm::locate();
    let missing = located.as_ref().err().map(ToString::to_string);
    tessera_built_libs::require(test, located.is_ok(), || missing.unwrap_or_default())?;
    located.ok()
}

pub fn render(helm: &Helm, values: &str, caps: &Capabilities) -> Vec<Value> {
    helm.render(&Release::new(RELEASE, NAMESPACE).values(values), caps)
        .unwrap_or_else(|e| panic!("rendering with values {values:?}: {e}"))
}

/// The one object of this kind and name.
pub fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "{kind} {name}: found {}", found.len());
    found[0]
}

pub fn kinds(objects: &[Value]) -> Vec<String> {
    let mut k: Vec<String> = objects
        .iter()
        .map(|o| o["kind"].as_str().unwrap_or("?").to_string())
        .collect();
    k.sort();
    k
}

pub fn args(container: &Value) -> Vec<String> {
    container["args"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}
