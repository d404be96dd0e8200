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
    use std::io::Write;
    match std::env::var("TESSERA_E2E").ok().as_deref() {
        Some("0") => {
            let _ = writeln!(std::io::stderr(), "SKIP {test}: TESSERA_E2E=0");
            None
        }
        Some(_) => Some(
            Helm::locate()
                .unwrap_or_else(|e| panic!("TESSERA_E2E is set, so {test} must run, but: {e}")),
        ),
        None => match Helm::locate() {
            Ok(h) => Some(h),
            Err(e) => {
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIP {test}: {e}\n  (set TESSERA_E2E=1 to make a missing helm a failure)"
                );
                None
            }
        },
    }
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
