//! Comparing what was sent with what the API server kept.
//!
//! The server canonicalises quantities (`25769803776` comes back as `24Gi`) and silently drops
//! fields whose feature gate is off, so neither `==` nor a typed round trip tells whether a slice
//! survived: these functions compare JSON with quantities parsed.

use serde_json::Value;

/// Paths present in `sent` but missing from `got` (a dropped gated field); scalar values are not
/// compared here.
pub fn dropped_fields(sent: &Value, got: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk(sent, got, String::new(), &mut out);
    out
}

fn walk(sent: &Value, got: &Value, path: String, out: &mut Vec<String>) {
    match (sent, got) {
        (Value::Object(s), Value::Object(g)) => {
            for (k, v) in s {
                if v.is_null() {
                    continue;
                }
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match g.get(k) {
                    Some(gv) if !gv.is_null() => walk(v, gv, p, out),
                    _ => out.push(p),
                }
            }
        }
        (Value::Array(s), Value::Array(g)) => {
            for (i, v) in s.iter().enumerate() {
                match g.get(i) {
                    Some(gv) => walk(v, gv, format!("{path}[{i}]"), out),
                    None => out.push(format!("{path}[{i}]")),
                }
            }
        }
        _ => {}
    }
}

/// Whether two specs say the same, with quantities compared by value and missing keys equal to
/// `null` (the server omits empty fields).
pub fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            // A taint's `timeAdded` is the API server's to set, when the taint first appears.
            let keys = x
                .iter()
                .chain(y.iter())
                .filter(|(k, v)| !v.is_null() && k.as_str() != "timeAdded")
                .map(|(k, _)| k);
            for k in keys {
                if !same(
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                ) {
                    return false;
                }
            }
            true
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::String(x), Value::String(y)) => {
            x == y || quantity(x).is_some_and(|q| Some(q) == quantity(y))
        }
        (Value::Number(x), Value::String(y)) | (Value::String(y), Value::Number(x)) => {
            x.as_u64().is_some_and(|n| Some(n) == quantity(y))
        }
        _ => a == b,
    }
}

fn quantity(text: &str) -> Option<u64> {
    // Only strings that look like quantities: a leading digit.
    text.starts_with(|c: char| c.is_ascii_digit())
        .then(|| tessera_driver::quantity::parse(text).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_dropped_gated_fields() {
        let sent = json!({"devices": [{"name": "gpu-0", "allowMultipleAllocations": true, "capacity": {"memory": {"value": "1", "requestPolicy": {}}}}]});
        let got = json!({"devices": [{"name": "gpu-0", "capacity": {"memory": {"value": "1"}}}]});
        assert_eq!(
            dropped_fields(&sent, &got),
            vec![
                "devices[0].allowMultipleAllocations",
                "devices[0].capacity.memory.requestPolicy"
            ]
        );
        assert!(dropped_fields(&sent, &sent).is_empty());
    }

    #[test]
    fn quantities_compare_by_value() {
        assert!(same(
            &json!({"v": "25769803776", "n": null}),
            &json!({"v": "24Gi"})
        ));
        assert!(!same(&json!({"v": "25769803776"}), &json!({"v": "23Gi"})));
        assert!(!same(&json!({"a": "x"}), &json!({"a": "x", "b": 1})));
        assert!(same(&json!({"g": 3}), &json!({"g": 3})));
        assert!(same(
            &json!({"taints": [{"key": "k", "effect": "NoSchedule"}]}),
            &json!({"taints": [{"key": "k", "effect": "NoSchedule", "timeAdded": "2026-12-07T16:00:00Z"}]})
        ));
    }
}
